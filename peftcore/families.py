"""What peftcore knows about each model family, in one table; the layers work on any nn.Linear.

A family is a transformers ``model_type``. Its entry says what peft does by default for it and
what transformers keeps in full precision, so that ``quantize``, peft-file defaults and the CLI
follow the model in hand, not T5:

- ``lora_targets`` / ``ia3_targets`` / ``ia3_feedforward``: peft's default modules for the family
  (``peft.utils.constants``); ``None`` where peft has none (then a config or a file must name them).
- ``keep_in_full_precision``: modules ``quantize`` leaves unquantized by default: what transformers
  keeps in fp32 when loading the family in 4 bit (the model class's fp32 list: T5's ``wo``) and the
  output projection ``lm_head``.
- ``task_prefix``: the text put before each input for summarisation (T5's ``"summarize: "``); a
  checkpoint's own ``task_specific_params.summarization.prefix`` wins over it.
- ``dropout``: the config fields one dropout setting sets.

``task_type`` is what a model does as peft names it (``SEQ_2_SEQ_LM``, ``CAUSAL_LM``, ``SEQ_CLS``,
``TOKEN_CLS``, ``FEATURE_EXTRACTION``), read from its class the way transformers' auto classes
map them, so a saved adapter opens in peft's class for that task.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from transformers.models.auto import modeling_auto


@dataclass(frozen=True)
class Family:
    lora_targets: tuple[str, ...] | None
    ia3_targets: tuple[str, ...] | None
    ia3_feedforward: tuple[str, ...] | None
    keep_in_full_precision: tuple[str, ...] = ("lm_head",)
    task_prefix: str = ""
    dropout: tuple[str, ...] = ("dropout",)


_T5_NAMES = dict(keep_in_full_precision=("wo", "lm_head"), dropout=("dropout_rate",))
_BART_NAMES = dict(dropout=("dropout", "attention_dropout", "activation_dropout"))

FAMILIES: dict[str, Family] = {
    "t5": Family(("q", "v"), ("k", "v", "wo"), ("wo",), task_prefix="summarize: ", **_T5_NAMES),
    "mt5": Family(("q", "v"), ("k", "v", "wi_1"), (), **_T5_NAMES),
    "umt5": Family(None, None, None, **_T5_NAMES),
    "bart": Family(("q_proj", "v_proj"), ("q_proj", "v_proj", "fc2"), ("fc2",), **_BART_NAMES),
    "mbart": Family(None, None, None, **_BART_NAMES),
    "pegasus": Family(None, None, None, **_BART_NAMES),
    "llama": Family(("q_proj", "v_proj"), ("k_proj", "v_proj", "down_proj"), ("down_proj",)),
    "qwen2": Family(("q_proj", "v_proj"), ("q_proj", "v_proj", "down_proj"), ("down_proj",)),
    "gpt2": Family(("c_attn",), ("c_attn", "mlp.c_proj"), ("mlp.c_proj",)),
}

# A model whose family is not in the table: nothing is assumed beyond keeping lm_head unquantized.
UNKNOWN = Family(lora_targets=None, ia3_targets=None, ia3_feedforward=None)


def model_type(model: nn.Module) -> str | None:
    """The transformers ``model_type`` of ``model`` (None for a module without a config)."""
    return getattr(getattr(model, "config", None), "model_type", None)


def of(model: nn.Module) -> Family:
    """The table's entry for ``model``'s family, or ``UNKNOWN``."""
    return FAMILIES.get(model_type(model) or "", UNKNOWN)


# peft's task types, by the transformers auto-class mapping whose classes do that task.
_TASKS = (
    ("SEQ_2_SEQ_LM", modeling_auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES),
    ("CAUSAL_LM", modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES),
    ("SEQ_CLS", modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES),
    ("TOKEN_CLS", modeling_auto.MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES),
    ("FEATURE_EXTRACTION", modeling_auto.MODEL_MAPPING_NAMES),
)
# The classification heads peft trains in full for SEQ_CLS (its modules_to_save default).
CLASSIFICATION_HEADS = ("classifier", "score")


def task_type(model: nn.Module) -> str | None:
    """peft's task type for ``model``'s class, or None for a class none of them covers (a masked
    LM, say: peft then opens the adapter as a plain PeftModel)."""
    name = type(model).__name__
    for task, mapping in _TASKS:
        if any(name == cls or (isinstance(cls, tuple) and name in cls) for cls in mapping.values()):
            return task
    return None

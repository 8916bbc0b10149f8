"""The model a run trains, built from the module's settings before anything trains:

    from_pretrained(hub name | local path | bundled:<name>)     real weights, in float32
    or T5(config of a named shape), random weights              only with random_init: true

then, in the fine-tuning module, quantized (QLoRA) and given the method's adapter. The method
option's type (any method's config) and the allow-list that lets checkpoints holding those
configs load with ``weights_only=True`` live here too.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Union

import torch
import transformers
from transformers.models.auto.modeling_auto import MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES

from experiments.data import ASSETS, tokenizer_path
from experiments.data.tokenizer import BUNDLED as BUNDLED_TOKENIZER_NAME
from experiments.data.tokenizer import holds_tokenizer
from experiments.settings import GenerationSettings, OptimizerSettings
from peftcore import families, methods
from peftcore.config import NF4Config
from peftcore.t5 import SHAPES, t5_config

# Checkpoints store the hyperparameters, method configs included; torch.load(weights_only=True)
# (Lightning's default on resume) unpickles only allow-listed classes. These are plain dataclasses.
torch.serialization.add_safe_globals(
    [*methods.config_classes(), NF4Config, OptimizerSettings, GenerationSettings]
)
# The method option: any method's config (the CLI then knows their fields).
MethodConfig = Union[methods.config_classes()]  # noqa: UP007 (a Union of a runtime tuple)


def method_fields() -> str:
    """One line per method: its config class and its fields (for ``fit --help``)."""
    return "; ".join(
        f"{cls.__name__} ({', '.join(f.name for f in dataclasses.fields(cls))})"
        for cls in methods.config_classes()
    )


BUNDLED = "bundled:"  # pretrained: bundled:t5-tiny-dialogue names a model shipped in experiments/assets


def bundled_model(name: str) -> Path:
    path = ASSETS / name
    if not (path / "config.json").is_file():
        shipped = sorted(p.name for p in ASSETS.iterdir() if (p / "config.json").is_file())
        raise ValueError(f"no bundled model {name!r}; the bundled models are {shipped}")
    return path


def check_model_source(pretrained: str | None, shape: str | None, random_init: bool) -> None:
    """Exactly one of: real weights from ``pretrained``, or a named shape with ``random_init``."""
    if pretrained and shape:
        raise ValueError(f"give either pretrained ({pretrained!r}) or shape ({shape!r}), not both")
    if pretrained:
        if pretrained.startswith(BUNDLED):
            bundled_model(pretrained.removeprefix(BUNDLED))
        return
    if not shape:
        raise ValueError("set pretrained (a hub name such as google-t5/t5-base, or a local path) or shape")
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; known shapes: {sorted(SHAPES)}")
    if not random_init:
        raise ValueError(
            f"shape={shape!r} builds a model with random weights; set random_init: true to ask for that explicitly, "
            "or set pretrained to load real weights"
        )


def weights_path(pretrained: str) -> str:
    """Where ``from_pretrained`` reads ``pretrained``: a bundled model's directory, else as given."""
    return (
        str(bundled_model(pretrained.removeprefix(BUNDLED))) if pretrained.startswith(BUNDLED) else pretrained
    )


def seq2seq_config(pretrained: str) -> transformers.PretrainedConfig:
    """The config of ``pretrained``, refused by name unless transformers builds it as a
    sequence-to-sequence LM (``AutoModelForSeq2SeqLM``): summarisation here is text in, text out."""
    config = transformers.AutoConfig.from_pretrained(weights_path(pretrained))
    if config.model_type not in MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES:
        causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in config.architectures or [])
        kind = (
            "a causal (decoder-only) language model" if causal else "no sequence-to-sequence language model"
        )
        raise ValueError(
            f"{pretrained} is a {config.model_type!r} model ({', '.join(config.architectures or [])}), {kind}: the "
            "summarisation CLI trains encoder-decoder models, those transformers' AutoModelForSeq2SeqLM builds "
            "(T5, flan-T5, mT5, UMT5, BART, mBART, Pegasus, ...). peftcore's library adapts any model in Python: "
            "peftcore.inject(model, config)"
        )
    return config


def dropout_fields(config: transformers.PretrainedConfig, dropout_rate: float) -> dict[str, float]:
    """The config fields one ``dropout_rate`` sets in the model's family (T5: ``dropout_rate``;
    BART and Pegasus: ``dropout``, ``attention_dropout``, ``activation_dropout``)."""
    family = families.FAMILIES.get(config.model_type)
    names = (
        family.dropout if family else tuple(n for n in ("dropout_rate", "dropout") if hasattr(config, n))[:1]
    )
    if not names:
        raise ValueError(
            f"model.dropout_rate cannot be set for model type {config.model_type!r}: its config has no dropout_rate "
            "or dropout field; leave dropout_rate null to keep the model's own"
        )
    return {name: dropout_rate for name in names}


def build_model(
    pretrained: str | None, shape: str | None, random_init: bool, gated: bool, dropout_rate: float | None
) -> transformers.PreTrainedModel:
    """The model ``check_model_source`` allows: real weights of any sequence-to-sequence family, in
    the class their config names (``AutoModelForSeq2SeqLM``), or a named T5 shape's random ones."""
    check_model_source(pretrained, shape, random_init)
    if pretrained:
        config = seq2seq_config(pretrained)
        overrides = {} if dropout_rate is None else dropout_fields(config, dropout_rate)
        # float32 whatever the file stores (the shipped tiny base is bfloat16 on disk): Lightning's
        # precision setting decides the compute dtype.
        return transformers.AutoModelForSeq2SeqLM.from_pretrained(
            weights_path(pretrained), dtype=torch.float32, **overrides
        )
    config = t5_config(shape, gated=gated)
    for key, value in ({} if dropout_rate is None else dropout_fields(config, dropout_rate)).items():
        setattr(config, key, value)
    return transformers.T5ForConditionalGeneration(config)


def summarisation_defaults(pretrained: str | None, shape: str | None) -> dict[str, str]:
    """The data settings the model decides when a config leaves them unset: the task ``prefix``
    (the checkpoint's ``task_specific_params.summarization.prefix``, else its family's: T5's
    ``"summarize: "``, none for the others) and the ``tokenizer`` (the model directory's own, else
    the bundled T5 tokenizer for T5 models, else the model's hub name)."""
    if not pretrained:
        return {"prefix": families.FAMILIES["t5"].task_prefix, "tokenizer": BUNDLED_TOKENIZER_NAME}
    config = seq2seq_config(pretrained)
    summarisation = (getattr(config, "task_specific_params", None) or {}).get("summarization") or {}
    family = families.FAMILIES.get(config.model_type, families.UNKNOWN)
    path = Path(weights_path(pretrained))
    if holds_tokenizer(path):
        tokenizer = str(path)
    elif config.model_type == "t5":
        tokenizer = BUNDLED_TOKENIZER_NAME
    else:
        tokenizer = pretrained
    return {"prefix": summarisation.get("prefix", family.task_prefix), "tokenizer": tokenizer}


def with_tokenizer_path(peft: MethodConfig) -> MethodConfig:
    """``peft`` with its ``tokenizer`` (prompt tuning's text init) as a hub name or a path: a
    bundled name (``bundled:t5-tokenizer``) becomes the shipped tokenizer's path, found from any
    working directory (the saved hyperparameters keep the portable name)."""
    tokenizer = getattr(peft, "tokenizer", None)
    return peft if tokenizer is None else dataclasses.replace(peft, tokenizer=tokenizer_path(tokenizer))

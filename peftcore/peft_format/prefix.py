"""Prefix tuning in peft's files: PrefixTuningConfig's fields (and PromptLearningConfig's,
unchanged from 0.17 to 0.21) and ``prompt_embeddings``.

peft saves one tensor, ``prompt_embeddings`` (P, 2 L D): the table the decoder's keys and values
are cut from. With ``prefix_projection`` it is the MLP's output, not the MLP (peft loads such a
file as a plain table, and so does peftcore: a model built from the file computes the same, and
trains the table if trained further).
"""

from __future__ import annotations

import torch
from torch import nn

from peftcore.peft_format.base import Format
from peftcore.prefix import PrefixEncoder, PrefixTuningConfig, Shape

TENSOR = "prompt_embeddings"


class PrefixTuningFormat(Format):
    peft_type = "PREFIX_TUNING"
    label = "prefix-tuning"
    names = {"init_weights": "init"}
    implemented = (
        "num_virtual_tokens",
        "token_dim",  # must be the model's d_model
        "num_attention_heads",  # must be the model's
        "num_layers",  # must be the model's encoder layers
        "num_transformer_submodules",  # 2 for encoder-decoders
        "prefix_projection",  # the file holds the projected table either way
    )
    at_default = {"modules_to_save": (None, "modules trained in full next to a prefix")}
    inert = {
        "encoder_hidden_size": "the MLP's width; the file holds its output",
        "init_weights": "the init, which the file's table replaces",
    }

    def config_from_peft(self, data: dict, model: nn.Module) -> PrefixTuningConfig:
        self.check_fields(data)
        if not isinstance(data.get("num_virtual_tokens"), int):
            raise ValueError(
                f"this prefix-tuning adapter has num_virtual_tokens={data.get('num_virtual_tokens')!r}; peft writes its length"
            )
        if data.get("task_type") not in (None, "SEQ_2_SEQ_LM"):
            raise ValueError(
                f"this prefix-tuning adapter has task_type={data['task_type']!r}; peftcore's prefix tuning is for "
                "seq2seq (T5-family) models (task_type 'SEQ_2_SEQ_LM')"
            )
        shape = Shape.of(model)
        expected = {
            "token_dim": shape.d_model,
            "num_attention_heads": shape.heads,
            "num_layers": shape.encoder_layers,
            "num_transformer_submodules": 2,
        }
        for key, value in expected.items():
            if data.get(key) not in (None, value):
                raise ValueError(
                    f"this prefix-tuning adapter has {key}={data[key]!r}; this model's is {value}"
                )
        return PrefixTuningConfig(num_virtual_tokens=data["num_virtual_tokens"])

    def config_to_peft(self, config: PrefixTuningConfig, model: nn.Module) -> dict:
        shape = Shape.of(model)
        return {
            "peft_type": self.peft_type,
            "num_virtual_tokens": config.num_virtual_tokens,
            "token_dim": shape.d_model,
            "num_transformer_submodules": 2,
            "num_attention_heads": shape.heads,
            "num_layers": shape.encoder_layers,
            "encoder_hidden_size": config.encoder_hidden_size or shape.d_model,
            "prefix_projection": config.prefix_projection,
            "init_weights": "zero" if config.init == "zero" else None,
            "modules_to_save": None,
        }

    def peft_tensors(self, prefix: PrefixEncoder) -> dict[str, torch.Tensor]:
        """The live table under peft's name (a projected prefix is refused before loading: differs)."""
        return {TENSOR: prefix.embedding}

    def saved_tensors(self, prefix: PrefixEncoder) -> dict[str, torch.Tensor]:
        """The table the decoder reads: with a projection, the MLP's output (as peft saves it)."""
        return {TENSOR: prefix.table().detach()}

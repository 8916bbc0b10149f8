"""LoRA in peft's files: LoraConfig's fields (releases 0.17 to 0.21), inits, and the old layer rule.

Every field of peft's LoraConfig is in exactly one of the three tables below (PeftConfig's own
fields are in fields.METADATA; see fields.check_fields). The tensors keep peft's names
(``lora_A.weight``, ``lora_B.weight``), so only a pissa_niter layer's need converting.
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from collections.abc import Sequence

import torch
from torch import nn

from peftcore.lora import LoRAConfig, LoRALinear
from peftcore.matching import select_targets, shown
from peftcore.peft_format.base import Format
from peftcore.peft_format.fields import (
    check_fan_in_fan_out,
    default_targets,
    fan_in_fan_out_to_peft,
    modules_to_save_of,
    peft_version,
)

# init_lora_weights values whose saved adapter is a plain LoRA over the untouched base (the init
# only decides where training starts; the file's A and B replace it).
PLAIN_INITS = {
    True: "kaiming",
    False: "kaiming",
    "gaussian": "gaussian",
    "eva": "kaiming",
    "orthogonal": "kaiming",
}
REFUSED_INITS = {
    "corda": "CorDA's init changed the base weight using calibration data",
    "lora_ga": "LoRA-GA changed the base weight using gradients of training data (peft does not rebuild it on load)",
    "mica": "MiCA is a LoRA variant (a frozen B) peftcore does not implement",
}


class LoRAFormat(Format):
    peft_type = "LORA"
    label = "LoRA"
    names = {"lora_alpha": "alpha", "lora_dropout": "dropout", "init_lora_weights": "init"}
    implemented = (
        "r",
        "lora_alpha",
        "lora_dropout",
        "target_modules",
        "exclude_modules",
        "use_rslora",
        "modules_to_save",
        "init_lora_weights",
        "rank_pattern",
        "alpha_pattern",
        "layers_to_transform",
        "layers_pattern",
        "bias",  # "none"; "lora_only" / "all" only where those biases do not exist (T5 has none)
        "fan_in_fan_out",  # true for Conv1D targets, false for nn.Linear: peft sets it by the target, so does peftcore
        "loftq_config",  # loftq_iter with init_lora_weights="loftq" (re-run on load, as peft does); else empty
    )
    at_default = {
        "use_dora": (False, "DoRA"),
        "lora_bias": (False, "a trainable bias on lora_B"),
        "use_qalora": (False, "QALoRA, for GPTQ bases"),
        "megatron_config": (None, "Megatron parallel layers"),
        "trainable_token_indices": (None, "training chosen token embeddings"),
        "layer_replication": (None, "layer replication"),
        "target_parameters": (None, "adapting nn.Parameters directly"),
        "alora_invocation_tokens": (None, "activated LoRA"),
        "arrow_config": (None, "Arrow routing over several LoRAs"),
        "ensure_weight_tying": (False, "adapters tied across tied layers"),
        "use_bdlora": (None, "block-diagonal LoRA"),
        "velora_config": (None, "VeLoRA's compressed activations"),
        "monteclora_config": (None, "MonteCLoRA"),
        "kasa_config": (None, "KaSA, which truncates the base weight"),
    }
    inert = {
        "qalora_group_size": "used only with use_qalora",
        "megatron_core": "used only with megatron_config",
        "eva_config": "used only while EVA computes its init; a saved EVA adapter is a plain LoRA",
        "corda_config": "used only by init_lora_weights='corda', which is refused",
        "lora_ga_config": "used only by init_lora_weights='lora_ga', which is refused",
    }
    config_class: type = LoRAConfig  # what config_from_peft builds (DoRA's translator builds a DoRAConfig)

    def claims(self, data: dict) -> bool:
        return data.get("peft_type") == self.peft_type and not data.get("use_dora")

    def config_from_peft(self, data: dict, model: nn.Module) -> LoRAConfig:
        self.check_fields(data)
        targets = data.get("target_modules") or default_targets(model, "lora_targets", self.label)
        layers = data.get("layers_to_transform")
        config = self.config_class(
            r=data.get("r", 8),
            alpha=data.get("lora_alpha", 8),
            dropout=data.get("lora_dropout", 0.0),
            target_modules=targets if isinstance(targets, str) else tuple(targets),
            init=_init_from_peft(data.get("init_lora_weights", True)),
            loftq_iter=_loftq_iter(data),
            use_rslora=bool(data.get("use_rslora", False)),
            modules_to_save=modules_to_save_of(data, model),
            exclude_modules=data.get("exclude_modules"),
            rank_pattern=data.get("rank_pattern") or {},
            alpha_pattern=data.get("alpha_pattern") or {},
            layers_to_transform=layers if layers not in ([], None) else None,
            layers_pattern=data.get("layers_pattern") or None,
        )
        if config.layers_to_transform is not None and peft_version(data) < (0, 20):
            # peft <= 0.19 read a layer's index from the last numbered segment of its name: name the
            # modules it selected, since a layers_to_transform here means the first one (peft >= 0.20).
            names = tuple(select_targets(model, config, layer_rule=layer_index_before_0_20))
            config = dataclasses.replace(
                config, target_modules=names, layers_to_transform=None, layers_pattern=None
            )
        _check_bias(data.get("bias", "none"), model, config)
        check_fan_in_fan_out(data, model, config)
        if config.init.startswith("pissa_niter"):
            warnings.warn(
                f"init_lora_weights={config.init!r} is re-run on load, as peft does; its SVD is randomised, so the "
                "residual base differs from the one the adapter was trained on, and the model is close to, not equal "
                "to, the trained one. For an exact file, save it from peft with path_initial_model_for_weight_conversion "
                "(peftcore's save_adapter converts such adapters itself)",
                stacklevel=3,
            )
        return config

    def config_to_peft(self, config: LoRAConfig, model: nn.Module) -> dict:
        """peft's LoraConfig fields for ``config``.

        PiSSA and OLoRA are written by name: peft re-runs them on the original base on load and gets
        the same residual. ``pissa_niter_<N>`` is randomised and LoRA-GA depends on training data's
        gradients, so their adapters are written converted,
        relative to the original base, with rank 2r (see ``saved_tensors``), as peft's
        ``path_initial_model_for_weight_conversion`` does; alpha is scaled to keep every layer's scale.
        """
        converted = config.init.startswith("pissa_niter") or config.init == "lora_ga"
        rank_factor = 2 if converted else 1
        alpha_factor = (math.sqrt(2) if config.use_rslora else 2) if converted else 1
        init = True if converted else {"kaiming": True}.get(config.init, config.init)
        loftq = {"loftq_bits": 4, "loftq_iter": config.loftq_iter} if config.init == "loftq" else {}
        return {
            "peft_type": self.peft_type,
            "r": config.r * rank_factor,
            "lora_alpha": config.alpha * alpha_factor,
            "lora_dropout": config.dropout,
            "use_rslora": config.use_rslora,
            "init_lora_weights": init,
            "rank_pattern": {k: v * rank_factor for k, v in config.rank_pattern.items()},
            "alpha_pattern": {k: v * alpha_factor for k, v in config.alpha_pattern.items()},
            "layers_to_transform": shown(config.layers_to_transform),
            "layers_pattern": shown(config.layers_pattern),
            "bias": "none",
            "fan_in_fan_out": fan_in_fan_out_to_peft(model, config),
            "loftq_config": loftq,
        }

    # peft_tensors: the layer's adapter_params, already under peft's names (lora_A.weight, lora_B.weight).

    def saved_tensors(self, layer: LoRALinear) -> dict[str, torch.Tensor]:
        """The live tensors, or for a pissa_niter or lora_ga layer the rank-2r adapter relative to the
        original base: s [B, -B0] [A; A0] = s (B A - B0 A0) = W + s B A - W_original."""
        if layer.initial_A is None:
            return self.peft_tensors(layer)
        return {
            "lora_A.weight": torch.cat([layer.lora_A.weight, layer.initial_A], dim=0),
            "lora_B.weight": torch.cat([layer.lora_B.weight, -layer.initial_B], dim=1),
        }


def layer_index_before_0_20(name: str, layers_pattern: Sequence[str] | None) -> int | None:
    """The layer index peft <= 0.19 compared with layers_to_transform: its greedy regex read the
    last numbered segment, on T5 the sub-layer inside a block (``encoder.block.3.layer.0.SelfAttention.q``
    -> 0), not the block (matching.layer_index is peft >= 0.20's rule)."""
    if not layers_pattern:
        match = re.match(r".*\.[^.]*\.(\d+)\.", name)
    else:
        match = next((m for p in layers_pattern if (m := re.match(rf".*\.{p}\.(\d+)\.", name))), None)
    return int(match.group(1)) if match else None


def _loftq_iter(data: dict) -> int:
    """LoftQ's alternations from ``loftq_config`` (4-bit only), 1 where the init is not LoftQ; a
    setting that would be ignored is refused."""
    loftq = data.get("loftq_config") or {}
    if data.get("init_lora_weights") != "loftq":
        if loftq:
            raise ValueError(
                f"this LoRA adapter sets loftq_config={loftq!r} with init_lora_weights={data.get('init_lora_weights')!r}: "
                "it has no effect there; remove it, or set init_lora_weights='loftq'"
            )
        return 1
    unknown = sorted(set(loftq) - {"loftq_bits", "loftq_iter"})
    if unknown or loftq.get("loftq_bits", 4) != 4:
        raise ValueError(
            f"this LoRA adapter has loftq_config={loftq!r}: peftcore's LoftQ quantizes to NF4 (loftq_bits=4) "
            "and reads loftq_iter only"
        )
    return loftq.get("loftq_iter", 1)


def _init_from_peft(value: object) -> str:
    if isinstance(value, (bool, str)) and value in PLAIN_INITS:
        return PLAIN_INITS[value]
    if isinstance(value, str) and (value.startswith("pissa") or value.lower() in ("olora", "loftq")):
        return (
            value.lower() if value.lower() in ("olora", "loftq") else value
        )  # LoRAConfig checks pissa_niter_<N>
    name = next((k for k in REFUSED_INITS if isinstance(value, str) and value.lower().startswith(k)), None)
    why = (
        REFUSED_INITS[name] + ", which peftcore does not rebuild"
        if name
        else "an init peftcore does not know"
    )
    raise ValueError(
        f"this LoRA adapter has init_lora_weights={value!r}: {why}. Convert it in peft to a plain LoRA relative "
        "to the original base (save_pretrained(..., path_initial_model_for_weight_conversion=...)) and load that"
    )


def _check_bias(bias: object, model: nn.Module, config: LoRAConfig) -> None:
    """peft trains the biases that ``bias`` names; peftcore has no such biases to train, so the
    value is honoured only where there are none."""
    if bias in (None, "none"):
        return
    if bias == "all":
        found = [n for n, _ in model.named_parameters() if "bias" in n]
    elif bias == "lora_only":
        modules = dict(model.named_modules())
        found = [
            f"{n}.bias"
            for n in select_targets(model, config)
            if getattr(modules[n], "bias", None) is not None
        ]
    else:
        raise ValueError(f"this LoRA adapter has bias={bias!r}; peft allows 'none', 'all' or 'lora_only'")
    if found:
        raise ValueError(
            f"this LoRA adapter has bias={bias!r}, which trains {len(found)} bias tensors of this model "
            f"(e.g. {found[0]!r}); peftcore does not train biases, so it cannot load the adapter exactly"
        )

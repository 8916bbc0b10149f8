"""Save and load adapters in HF peft's directory format, so either library can read the other's.

    adapter_config.json          peft_type, task_type, r, lora_alpha, target_modules, ...
    adapter_model.safetensors    base_model.model.<module>.lora_A.weight   (r, in)
                                 base_model.model.<module>.lora_B.weight   (out, r)
                                 base_model.model.<module>.ia3_l           (out, 1), or (1, in) feed-forward
                                 base_model.model.<module>.<param>         modules_to_save, in full

Names are translated here and nowhere else. Files are written to temporary names and renamed
into place, so an interrupted save never leaves a half-written adapter behind.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from peftcore.config import IA3Config, LoRAConfig
from peftcore.ia3 import IA3Scaler
from peftcore.lora import LoRALinear
from peftcore.surgery import AdapterConfig, adapter_layers, find_targets, inject, unload

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
PathLike = Union[str, os.PathLike]


def save_adapter(model: nn.Module, path: PathLike) -> None:
    """Write the model's adapter (and modules_to_save) to directory ``path`` in peft's format."""
    config = _injected_config(model)
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {key: t.detach().to("cpu").contiguous().clone() for key, t in _peft_tensors(model, config).items()}
    peft_config = _to_peft_config(config, model)
    _write_atomically(directory / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    _write_atomically(
        directory / CONFIG_NAME, lambda tmp: Path(tmp).write_text(json.dumps(peft_config, indent=2, sort_keys=True))
    )


def load_adapter(model: nn.Module, path: PathLike) -> nn.Module:
    """Load an adapter saved by peftcore or peft into ``model`` (injecting it first if the model
    has none). Every key and shape is checked before anything is copied; on a mismatch the model
    is left as it was."""
    directory = Path(path)
    config = _from_peft_config(_read_json(directory / CONFIG_NAME))
    try:
        saved = load_file(directory / WEIGHTS_NAME)
    except FileNotFoundError:
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {directory}; an adapter directory holds it and {CONFIG_NAME}")
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(
            f"{directory / WEIGHTS_NAME} is not a readable safetensors file ({err}); it may be truncated or "
            "corrupt: save the adapter again"
        ) from None

    injected_here = next(adapter_layers(model), None) is None
    if not injected_here:
        _check_same_method(_injected_config(model), config, directory)
    else:
        grad_flags = {id(p): p.requires_grad for p in model.parameters()}
        inject(model, config)
    try:
        live = {**_peft_tensors(model, _injected_config(model)), **_saved_base_weights(model, saved)}
        _check_fits(saved, live, directory)
    except Exception:
        if injected_here:  # roll back: the model leaves exactly as it came
            unload(model, merge=False)
            for p in model.parameters():
                p.requires_grad_(grad_flags[id(p)])
        raise
    with torch.no_grad():
        for key, tensor in live.items():
            tensor.copy_(saved[key].reshape(tensor.shape))
    return model


def _injected_config(model: nn.Module) -> AdapterConfig:
    config = getattr(model, "peftcore_config", None)
    if config is None:
        raise ValueError("the model has no adapter: call peftcore.inject(model, config) first")
    return config


def _peft_tensors(model: nn.Module, config: AdapterConfig) -> dict[str, torch.Tensor]:
    """The live adapter tensors under the names peft saves them as (views where shapes differ)."""
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in adapter_layers(model):
        if isinstance(layer, LoRALinear):
            tensors[f"{PREFIX}{name}.lora_A.weight"] = layer.lora_A.weight
            tensors[f"{PREFIX}{name}.lora_B.weight"] = layer.lora_B.weight
        elif isinstance(layer, IA3Scaler):
            shape = (1, -1) if layer.feedforward else (-1, 1)
            tensors[f"{PREFIX}{name}.ia3_l"] = layer.scale.view(shape)
    if config.modules_to_save:
        for name in find_targets(model, config.modules_to_save, "modules_to_save"):
            for key, tensor in model.get_submodule(name).state_dict(keep_vars=True).items():
                tensors[f"{PREFIX}{name}.{key}"] = tensor
    return tensors


def _saved_base_weights(model: nn.Module, saved: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """peft also saves a target's base weight when it is an embedding-tied layer (lm_head:
    ``save_embedding_layers``); such a tensor is loaded into the base, as peft does."""
    keys = {f"{PREFIX}{name}.base_layer.weight": layer for name, layer in adapter_layers(model)}
    return {key: layer.base.weight for key, layer in keys.items() if key in saved}


def _check_same_method(current: AdapterConfig, saved: AdapterConfig, directory: Path) -> None:
    """An adapter loaded into an injected model must compute the same function it was trained as."""
    fields = ("r", "alpha", "use_rslora") if isinstance(saved, LoRAConfig) else ("feedforward_modules",)
    if type(current) is not type(saved) or any(getattr(current, f) != getattr(saved, f) for f in fields):
        raise ValueError(
            f"the adapter in {directory} is {saved}, but the model already holds {current}; "
            "load it into a model without an adapter (or call peftcore.unload(model) first)"
        )


def _check_fits(saved: dict[str, torch.Tensor], live: dict[str, torch.Tensor], directory: Path) -> None:
    missing = [k for k in live if k not in saved]
    unexpected = [k for k in saved if k not in live]
    if missing or unexpected:
        first = f"missing key {missing[0]!r}" if missing else f"unexpected key {unexpected[0]!r}"
        raise ValueError(
            f"the adapter in {directory} does not fit this model: {first} "
            f"({len(missing)} missing, {len(unexpected)} unexpected). Was it trained on another architecture "
            "or with other target_modules?"
        )
    for key, tensor in live.items():
        if saved[key].numel() != tensor.numel() or saved[key].dim() != tensor.dim():
            raise ValueError(
                f"the adapter in {directory} does not fit this model: {key!r} has shape "
                f"{tuple(saved[key].shape)}, the model expects {tuple(tensor.shape)}"
            )


def _to_peft_config(config: AdapterConfig, model: nn.Module) -> dict:
    targets = config.target_modules if isinstance(config.target_modules, str) else list(config.target_modules)
    common = {
        "task_type": "SEQ_2_SEQ_LM",
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
        "target_modules": targets,
        "modules_to_save": list(config.modules_to_save) or None,
        "fan_in_fan_out": False,
        "inference_mode": True,
        "revision": None,
    }
    if isinstance(config, IA3Config):
        ff = config.feedforward_modules
        return {
            **common,
            "peft_type": "IA3",
            "feedforward_modules": ff if isinstance(ff, str) else list(ff),
            "init_ia3_weights": True,
        }
    # peft would re-run a PiSSA/OLoRA init on load; a trained adapter is a plain LoRA over the
    # residual base, so it is saved as one (peft's own PiSSA example does the same).
    init = {"kaiming": True, "gaussian": "gaussian"}.get(config.init, True)
    return {
        **common,
        "peft_type": "LORA",
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "use_rslora": config.use_rslora,
        "init_lora_weights": init,
        "bias": "none",
    }


def _from_peft_config(data: dict) -> AdapterConfig:
    peft_type = data.get("peft_type")
    to_save = tuple(data.get("modules_to_save") or ())
    targets = data.get("target_modules")
    if isinstance(targets, list):
        targets = tuple(targets)
    if peft_type == "LORA":
        unsupported = {k: data[k] for k in ("use_dora", "fan_in_fan_out") if data.get(k)}
        if data.get("bias", "none") != "none":
            unsupported["bias"] = data["bias"]
        if unsupported or data.get("rank_pattern") or data.get("alpha_pattern"):
            raise ValueError(
                f"this LoRA adapter uses settings peftcore does not implement: {unsupported or 'rank/alpha patterns'}"
            )
        return LoRAConfig(
            r=data["r"],
            alpha=data["lora_alpha"],
            dropout=data.get("lora_dropout", 0.0),
            target_modules=targets,
            use_rslora=bool(data.get("use_rslora", False)),
            modules_to_save=to_save,
        )
    if peft_type == "IA3":
        ff = data.get("feedforward_modules") or ()
        return IA3Config(target_modules=targets, feedforward_modules=tuple(ff) if isinstance(ff, list) else ff,
                         modules_to_save=to_save)
    raise ValueError(f"adapter peft_type {peft_type!r} is not supported; peftcore loads 'LORA' and 'IA3' adapters")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"no {path.name} in {path.parent}; is this an adapter directory?") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); save the adapter again") from None


def _write_atomically(target: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

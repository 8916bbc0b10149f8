"""Save and load adapters in HF peft's directory format, so either library can read the other's.

    adapter_config.json          peft_type, task_type, r, lora_alpha, target_modules, ...
    adapter_model.safetensors    base_model.model.<module>.lora_A.weight   (r, in)
                                 base_model.model.<module>.lora_B.weight   (out, r)
                                 base_model.model.<module>.ia3_l           (out, 1), or (1, in) feed-forward
                                 base_model.model.<module>.<param>         modules_to_save, the trained copy
    adapter_model.bin            the same tensors pickled (peft's safe_serialization=False); read
                                 with torch.load(weights_only=True), which runs no code from the file

    prompt_embeddings            a soft prompt (prompt tuning), (num_virtual_tokens x 2, d_model)

Each method translates its own config fields and tensor names (``config_from_peft``,
``config_to_peft``, ``peft_tensors``, ``saved_tensors`` in its module, found through
peftcore.methods); this module handles the files, the fields every method shares, and the
checks. A loaded adapter computes exactly what it computed where it was saved, or the load is
refused with the reason: every key, shape and dtype is checked, and every value is finite (a
floating-point slot takes no int64 or bool tensor; one NaN or inf makes the logits NaN), before
anything is copied, and on a mismatch the model is left as it was. An adapter holding NaN or inf
is not saved either. Files are written to temporary names, synced and renamed into place
(peftcore.files), so an interrupted save never leaves a half-written file behind.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from types import ModuleType
from typing import Optional, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from peftcore import methods
from peftcore.files import write_atomically
from peftcore.matching import resolve_targets, shown, why_not_selected
from peftcore.peft_fields import PEFT_FORMAT_VERSION
from peftcore.surgery import AdapterConfig, adapter_layers, inject, trained_copies, unload

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLED_WEIGHTS_NAME = "adapter_model.bin"
PREFIX = "base_model.model."
PathLike = Union[str, os.PathLike]


def save_adapter(model: nn.Module, path: PathLike) -> None:
    """Write the model's adapter (and modules_to_save) to directory ``path`` in peft's format.
    An adapter holding NaN or inf (training diverged) is refused and nothing is written. A
    pickled adapter_model.bin already there (peft's safe_serialization=False) is removed once the
    new files are in place, so the directory holds one adapter; other files are left alone."""
    config = _injected_config(model)
    method = methods.for_config(config)
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {key: t.detach().to("cpu").contiguous().clone() for key, t in _tensors(model, method, saving=True).items()}
    broken = _non_finite(tensors)
    if broken:
        raise ValueError(
            f"cannot save the adapter to {directory}: {broken}. Training diverged (a NaN or inf loss); nothing was "
            "written. Save the adapter of an earlier checkpoint, or train again (e.g. with a lower learning rate)"
        )
    peft_config = to_peft_config(config, model)
    write_atomically(directory / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    write_atomically(directory / CONFIG_NAME, json.dumps(peft_config, indent=2, sort_keys=True))
    _remove_replaced_pickle(directory)


def _remove_replaced_pickle(directory: Path) -> None:
    """peft's adapter_model.bin left from an earlier save is now a second, stale adapter beside
    the new safetensors file: removed, only once the new files are in place, and nothing else."""
    stale = directory / PICKLED_WEIGHTS_NAME
    if stale.is_file() or stale.is_symlink():
        stale.unlink()


def load_adapter(model: nn.Module, path: PathLike) -> nn.Module:
    """Load an adapter saved by peftcore or peft into ``model`` (injecting it first if the model
    has none). Every key, shape, dtype and value (finite) is checked before anything is copied;
    on a mismatch the model is left as it was."""
    directory = Path(path)
    data = _read_json(directory / CONFIG_NAME)
    try:
        method = methods.for_peft(data)
        config = method.config_from_peft(data, model)
        saved = _read_tensors(directory)
        if hasattr(method, "read_file_tensors"):
            saved = method.read_file_tensors(saved, data)
    except ValueError as err:
        raise ValueError(f"cannot load the adapter in {directory}: {err}") from None

    injected_here = next(adapter_layers(model), None) is None and next(trained_copies(model), None) is None
    if not injected_here:
        _check_same_method(model, config, directory)
    else:
        grad_flags = {id(p): p.requires_grad for p in model.parameters()}
        inject(model, config, initialise=False)  # the init may rewrite the base: only after the checks
    try:
        live = {**_tensors(model, method), **_saved_base_weights(model, saved)}
        _check_fits(saved, live, directory, model, config)
    except Exception:
        if injected_here:  # roll back: the model leaves exactly as it came
            unload(model, merge=False)
            for p in model.parameters():
                p.requires_grad_(grad_flags[id(p)])
        raise
    with torch.no_grad():
        if injected_here:
            for _, layer in adapter_layers(model):
                layer.initialise()  # PiSSA / OLoRA rebuild the residual base here, as peft does on load
        for key, tensor in live.items():
            tensor.copy_(saved[key])
    return model


def _injected_config(model: nn.Module) -> AdapterConfig:
    config = getattr(model, "peftcore_config", None)
    if config is None:
        raise ValueError("the model has no adapter: call peftcore.inject(model, config) first")
    return config


def _tensors(model: nn.Module, method: ModuleType, saving: bool = False) -> dict[str, torch.Tensor]:
    """The adapter's tensors under peft's names: live ones (to load into), or as saved. A layer's
    names follow its module's dotted name; an input transform's stand alone (prompt_embeddings)."""
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in adapter_layers(model):
        prefix = f"{PREFIX}{name}." if method.KIND == "layer" else ""
        for key, tensor in (method.saved_tensors if saving else method.peft_tensors)(layer).items():
            tensors[prefix + key] = tensor
    for name, copy in trained_copies(model):
        for key, tensor in copy.trained.state_dict(keep_vars=True).items():
            tensors[f"{PREFIX}{name}.{key}"] = tensor
    return tensors


def to_peft_config(config: AdapterConfig, model: nn.Module) -> dict:
    """adapter_config.json for ``config``: the fields every method writes the same way (and the
    targeting fields, for the methods that have them), then the method's own."""
    fields = {
        "task_type": "SEQ_2_SEQ_LM",
        "peft_version": PEFT_FORMAT_VERSION,
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
        "revision": None,
        "inference_mode": True,
    }
    if hasattr(config, "target_modules"):
        fields.update(
            target_modules=shown(config.target_modules),
            exclude_modules=shown(config.exclude_modules),
            modules_to_save=list(config.modules_to_save) or None,
        )
    return {**fields, **methods.for_config(config).config_to_peft(config, model)}


def _read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """adapter_model.safetensors, or peft's pickled adapter_model.bin when that is all there is."""
    if (directory / WEIGHTS_NAME).exists() or not (directory / PICKLED_WEIGHTS_NAME).exists():
        try:
            return load_file(directory / WEIGHTS_NAME)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"no {WEIGHTS_NAME} (or {PICKLED_WEIGHTS_NAME}) in {directory}; an adapter directory holds it and "
                f"{CONFIG_NAME}"
            ) from None
        except (SafetensorError, OSError, ValueError) as err:
            raise ValueError(
                f"{directory / WEIGHTS_NAME} is not a readable safetensors file ({err}); it may be truncated or "
                "corrupt: save the adapter again"
            ) from None
    path = directory / PICKLED_WEIGHTS_NAME
    try:
        tensors = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{path} holds Python objects other than tensors ({str(err).splitlines()[0]}). peftcore reads .bin "
            "adapters only with torch.load(weights_only=True), which runs no code from the file; re-save the adapter "
            "with safetensors (peft: save_pretrained(..., safe_serialization=True))"
        ) from None
    except (RuntimeError, EOFError, OSError) as err:
        raise ValueError(f"{path} is not a readable torch file ({err}); it may be truncated or corrupt") from None
    if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
        raise ValueError(f"{path} does not hold a mapping of names to tensors, as an adapter file does")
    return tensors


def _saved_base_weights(model: nn.Module, saved: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """peft also saves a target's base weight when it is an embedding-tied layer (lm_head:
    ``save_embedding_layers``); such a tensor is loaded into the base, as peft does."""
    keys = {f"{PREFIX}{name}.base_layer.weight": layer for name, layer in adapter_layers(model)}
    return {key: layer.base.weight for key, layer in keys.items() if key in saved}


def _check_same_method(model: nn.Module, saved: AdapterConfig, directory: Path) -> None:
    """An adapter loaded into an injected model must compute the same function it was trained as."""
    current = _injected_config(model)
    if type(current) is not type(saved):
        raise ValueError(
            f"the adapter in {directory} is a {type(saved).__name__}, but the model already holds a "
            f"{type(current).__name__}; load it into a model without an adapter (or call peftcore.unload(model) first)"
        )
    method = methods.for_config(saved)
    for name, layer in adapter_layers(model):
        difference = method.differs(layer, name, saved)
        if difference:
            raise ValueError(
                f"the adapter in {directory} does not compute what the model's adapter does: {difference}; the model "
                "already holds an adapter, so load it into a model without one (or call peftcore.unload(model) first)"
            )


def _check_fits(
    saved: dict[str, torch.Tensor], live: dict[str, torch.Tensor], directory: Path, model: nn.Module, config: AdapterConfig
) -> None:
    missing = [k for k in live if k not in saved]
    unexpected = [k for k in saved if k not in live]
    if missing or unexpected:
        key = unexpected[0] if unexpected else missing[0]
        first = f"unexpected key {key!r}" if unexpected else f"missing key {key!r}"
        raise ValueError(
            f"the adapter in {directory} does not fit this model: {first} ({len(missing)} missing, "
            f"{len(unexpected)} unexpected). {_explain(key, key in saved, model, config)}"
        )
    for key, tensor in live.items():
        if saved[key].shape != tensor.shape:  # exact: a (1, n) feed-forward vector never fills an (n, 1) slot
            raise ValueError(
                f"the adapter in {directory} does not fit this model: {key!r} has shape "
                f"{tuple(saved[key].shape)}, the model expects {tuple(tensor.shape)}"
            )
    _check_values(saved, live, directory)


def _check_values(saved: dict[str, torch.Tensor], live: dict[str, torch.Tensor], directory: Path) -> None:
    """A floating-point slot takes only floating-point values (copy_ would turn an int64 or bool
    tensor into numbers silently), and only finite ones (one NaN makes every logit NaN)."""
    for key, tensor in live.items():
        kind_ok = saved[key].is_floating_point() if tensor.is_floating_point() else saved[key].dtype == tensor.dtype
        if not kind_ok:
            raise ValueError(
                f"the adapter in {directory} holds {key!r} as {saved[key].dtype}, but the model's tensor is "
                f"{tensor.dtype} and adapter tensors are floating point; copying it would convert its values "
                "silently. The file was not written as an adapter by peft or peftcore (or was altered): save the "
                "adapter again from the trained model"
            )
    broken = _non_finite({key: saved[key] for key in live})
    if broken:
        raise ValueError(
            f"the adapter in {directory} holds non-finite values: {broken}, which make the model's logits NaN. The "
            "adapter diverged in training: load the adapter of an earlier checkpoint, or train again (e.g. with a "
            "lower learning rate)"
        )


def _non_finite(tensors: dict[str, torch.Tensor]) -> Optional[str]:
    """The first floating-point tensor holding NaN or inf, with its counts, and how many others do; None if none."""
    found = []
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            nan, inf = int(torch.isnan(tensor).sum()), int(torch.isinf(tensor).sum())
            found.append(f"{key!r} has {nan} NaN and {inf} inf values (of {tensor.numel()})")
    if not found:
        return None
    return found[0] + (f", and {len(found) - 1} more tensors have some" if len(found) > 1 else "")


def _explain(key: str, in_file: bool, model: nn.Module, config: AdapterConfig) -> str:
    """Which config field explains a key that does not fit, when one does."""
    modules = dict(model.named_modules())
    path = key.removeprefix(PREFIX).split(".")
    name = next((".".join(path[:i]) for i in range(len(path) - 1, 0, -1) if ".".join(path[:i]) in modules), None)
    if name is None:
        return f"This model has no module {'.'.join(path[:-1])!r}: was the adapter trained on another architecture?"
    tensor = key.removeprefix(f"{PREFIX}{name}.")
    adapted = {n for n, _ in adapter_layers(model)} | {n for n, _ in trained_copies(model)}
    if not in_file:
        return f"The config adapts {name!r}, but the file has no {tensor!r} for it."
    if name in adapted:
        return f"The file holds {tensor!r} for {name!r}, which this adapter does not have."
    if not hasattr(config, "target_modules"):
        return f"This adapter has no {tensor!r} for {name!r}."
    if tensor in modules[name].state_dict():
        return f"The file holds {name!r} in full, but modules_to_save={list(config.modules_to_save)} does not name it."
    reason = why_not_selected(name, config, resolve_targets(model, config.target_modules))
    return f"The file has adapter tensors for {name!r}, but {reason}."


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"no {path.name} in {path.parent}; is this an adapter directory?") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); save the adapter again") from None

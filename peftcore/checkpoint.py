"""Save and load adapters in HF peft's directory format, so either library can read the other's.

    adapter_config.json          peft_type, task_type, r, lora_alpha, target_modules, ...
    adapter_model.safetensors    base_model.model.<module>.lora_A.weight   (r, in)
                                 base_model.model.<module>.lora_B.weight   (out, r)
                                 base_model.model.<module>.ia3_l           (out, 1), or (1, in) feed-forward
                                 base_model.model.<module>.<param>         modules_to_save, the trained copy
    adapter_model.bin            the same tensors pickled (peft's safe_serialization=False); read
                                 with torch.load(weights_only=True), which runs no code from the file

    prompt_embeddings            a soft prompt (prompt tuning), (num_virtual_tokens x 2, d_model)

Config fields and tensor names are translated in peftcore.peft_format (one translator per
method); this module handles the files and the checks. A loaded adapter computes exactly what
it computed where it was saved, or the load is refused with the reason: every key, shape and dtype is checked, and every value is finite (a
floating-point slot takes no int64 or bool tensor; one NaN or inf makes the logits NaN), before
anything is copied, and on a mismatch the model is left as it was. An adapter for a model of
another depth or width is refused as such first (ModelShapeMismatch, a ValueError: "trained on a
model with 6 encoder and 6 decoder layers and d_model 512; this model has ..."), read from the
file's names (highest block index) and shapes.

save_adapter refuses an adapter holding NaN or inf, writes each file to a temporary name, syncs
it and renames it into place (peftcore.files), so an interrupted save never leaves a
half-written file behind, and then removes a stale adapter_model.bin, so the directory holds
one adapter. The weights carry the config they were saved with (safetensors metadata), so a
save killed between its two files is refused on load instead of pairing new weights with an
old config.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from peftcore import adapters, loftq, methods, peft_format
from peftcore.files import write_atomically
from peftcore.matching import resolve_targets, why_not_selected
from peftcore.peft_format import PREFIX
from peftcore.surgery import AdapterConfig, adapter_layers, inject, trained_copies, unload

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLED_WEIGHTS_NAME = "adapter_model.bin"
# The safetensors metadata entry holding the config the tensors were written with (its fields
# that say what they compute; the file-level ones below may change, by hand too): the two files
# of one save are two renames, and a save killed between them must not load as one adapter.
SAVED_WITH = "peftcore_adapter_config"
# LoftQ: each layer's quantized base Q as a hash (peftcore.loftq.fingerprint). The file holds A and
# B only and a load re-runs LoftQ; a re-run that gives another Q is refused.
LOFTQ_BASES = "peftcore_loftq_bases"
FILE_LEVEL_FIELDS = ("base_model_name_or_path", "revision", "inference_mode", "auto_mapping", "peft_version")
PathLike = str | os.PathLike


def save_adapter(model: nn.Module, path: PathLike, names: Sequence[str] | None = None) -> None:
    """Write the model's adapter (and modules_to_save) to directory ``path`` in peft's format.
    An adapter holding NaN or inf (training diverged) is refused and nothing is written. A
    pickled adapter_model.bin already there (peft's safe_serialization=False) is removed once the
    new files are in place, so the directory holds one adapter; other files are left alone.

    With several named adapters (peftcore.adapters) each is written as peft's ``save_pretrained``
    lays them out: ``default`` in ``path``, any other in ``path/<name>``; ``names`` selects some
    (peft's ``selected_adapters``)."""
    _injected_config(model)
    every = adapters.adapter_names(model)
    merged_loftq = [
        n for n, layer in adapter_layers(model) if getattr(layer, "init", None) == "loftq" and layer.merged
    ]
    if merged_loftq:
        raise ValueError(
            f"the LoftQ adapter is merged (e.g. {merged_loftq[0]!r}): its file records the quantized base it was trained "
            "on, which merging changed; unmerge(model) (exact for LoftQ) and save"
        )
    if names is None and every == [adapters.DEFAULT]:
        _save_active(model, Path(path))
        return
    unknown = [n for n in (names or []) if n not in every]
    if unknown:
        raise ValueError(f"no adapters named {unknown}; the model's adapters: {every}")
    for name in every if names is None else names:  # names=[] saves none, as peft's selected_adapters
        with adapters.active(model, name):
            _save_active(model, Path(path) if name == adapters.DEFAULT else Path(path) / name)


def _save_active(model: nn.Module, directory: Path) -> None:
    config = _injected_config(model)
    methods.for_config(config)  # a TypeError for what is not a method config, before the directory exists
    directory.mkdir(parents=True, exist_ok=True)
    saved = peft_format.adapter_tensors(model, config, saving=True)
    tensors = {key: t.detach().to("cpu").contiguous().clone() for key, t in saved.items()}
    broken = _non_finite(tensors)
    if broken:
        raise ValueError(
            f"cannot save the adapter to {directory}: {broken}. Training diverged (a NaN or inf loss); nothing was "
            "written. Save the adapter of an earlier checkpoint, or train again (e.g. with a lower learning rate)"
        )
    peft_config = to_peft_config(config, model)
    metadata = {"format": "pt", SAVED_WITH: json.dumps(_what_it_computes(peft_config), sort_keys=True)}
    bases = _loftq_bases(model)
    if bases:
        metadata[LOFTQ_BASES] = json.dumps(bases, sort_keys=True)
    write_atomically(directory / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    write_atomically(directory / CONFIG_NAME, json.dumps(peft_config, indent=2, sort_keys=True))
    _remove_replaced_pickle(directory)


def _remove_replaced_pickle(directory: Path) -> None:
    """peft's adapter_model.bin left from an earlier save is now a second, stale adapter beside
    the new safetensors file: removed, only once the new files are in place, and nothing else."""
    stale = directory / PICKLED_WEIGHTS_NAME
    if stale.is_file() or stale.is_symlink():
        stale.unlink()


def load_adapter(model: nn.Module, path: PathLike, name: str | None = None) -> nn.Module:
    """Load an adapter saved by peftcore or peft into ``model`` (injecting it first if the model
    has none). Every key, shape, dtype and value (finite) is checked before anything is copied;
    on a mismatch the model is left as it was.

    ``name`` (peftcore.adapters): into a model holding adapters, a new name adds the file's adapter
    beside them, inactive and frozen (peft's ``load_adapter(path, adapter_name)``), and an existing
    one loads into that adapter; into a bare model, the loaded adapter gets that name."""
    if name is not None and getattr(model, "peftcore_config", None) is not None:
        if name in adapters.adapter_names(model):
            with adapters.active(model, name):
                return load_adapter(model, path)
        try:
            config = peft_format.config_from_peft(_read_json(Path(path) / CONFIG_NAME), model)
        except ValueError as err:
            raise ValueError(f"cannot load the adapter in {path}: {err}") from None
        adapters.add_adapter(model, config, name, lambda bare: load_adapter(bare, path))
        return model
    _load(model, Path(path))
    if name is not None:
        adapters.name_injected(model, name)
    return model


def _load(model: nn.Module, directory: Path) -> nn.Module:
    data = _read_json(directory / CONFIG_NAME)
    try:
        _check_one_save(directory, data)
        translator = peft_format.for_file(data)
        config = translator.config_from_peft(data, model)
        saved = translator.read_file_tensors(read_adapter_tensors(directory), data)
    except ValueError as err:
        raise ValueError(f"cannot load the adapter in {directory}: {err}") from None

    injected_here = next(adapter_layers(model), None) is None and next(trained_copies(model), None) is None
    if not injected_here:
        _check_same_method(model, config, directory)
    else:
        grad_flags = {id(p): p.requires_grad for p in model.parameters()}
        inject(model, config, initialise=False)  # the init may rewrite the base: only after the checks
    try:
        live = {**peft_format.adapter_tensors(model, config), **_saved_base_weights(model, saved)}
        _check_same_shape(saved, live, directory, model, config, data.get("base_model_name_or_path"))
        _check_fits(saved, live, directory, model, config)
    except Exception:
        if injected_here:  # roll back: the model leaves exactly as it came
            unload(model, merge=False)
            for p in model.parameters():
                p.requires_grad_(grad_flags[id(p)])
        raise
    with torch.no_grad():
        # LoftQ replaces a layer's base by its quantization: kept to put back on a refusal.
        originals = {
            n: layer.base for n, layer in adapter_layers(model) if getattr(layer, "init", None) == "loftq"
        }
        try:
            if injected_here:
                for _, layer in adapter_layers(model):
                    layer.initialise()  # PiSSA / OLoRA / LoftQ rebuild the base here, as peft does on load
            _check_loftq_bases(model, directory)
        except Exception:
            if injected_here:
                for name, layer in adapter_layers(model):
                    if name in originals:
                        layer.base = originals[name]
                unload(model, merge=False)
                for p in model.parameters():
                    p.requires_grad_(grad_flags[id(p)])
            raise
        for key, tensor in live.items():
            tensor.copy_(saved[key])
    return model


def _loftq_bases(model: nn.Module) -> dict[str, str]:
    return {
        name: loftq.fingerprint(layer.base)
        for name, layer in adapter_layers(model)
        if getattr(layer, "init", None) == "loftq"
    }


def _check_loftq_bases(model: nn.Module, directory: Path) -> None:
    """A LoftQ adapter saved by peftcore records each layer's Q; the re-run must give the same.
    (peft's files record none: their re-run, like peft's own, is taken as it comes.)"""
    bases = _loftq_bases(model)
    if not bases or not (directory / WEIGHTS_NAME).is_file():
        return
    with safe_open(directory / WEIGHTS_NAME, "pt") as weights:
        recorded = (weights.metadata() or {}).get(LOFTQ_BASES)
    if recorded is None:
        return
    differ = sorted(name for name, value in json.loads(recorded).items() if bases.get(name) != value)
    if differ:
        raise ValueError(
            f"cannot load the LoftQ adapter in {directory}: re-running LoftQ on this model's weights gives another "
            f"quantized base than the adapter was trained on, in {len(differ)} layers (first: {differ[0]!r}). The "
            "base weights differ, or (loftq_iter >= 2) the SVD rounded differently on this machine. Load it on the "
            "base model it was made from, on the same kind of machine, or use loftq_iter=1 (Q = NF4(W) everywhere)"
        )


def _injected_config(model: nn.Module) -> AdapterConfig:
    config = getattr(model, "peftcore_config", None)
    if config is None:
        raise ValueError("the model has no adapter: call peftcore.inject(model, config) first")
    return config


def to_peft_config(config: AdapterConfig, model: nn.Module) -> dict:
    """adapter_config.json for ``config`` (peft_format.config_to_peft)."""
    return peft_format.config_to_peft(config, model)


def _what_it_computes(peft_config: dict) -> dict:
    return {key: value for key, value in peft_config.items() if key not in FILE_LEVEL_FIELDS}


def _check_one_save(directory: Path, peft_config: dict) -> None:
    """Refuse a config and weights that come from different saves (a save_adapter killed between
    its two renames, or an edited config): with ``lora_alpha`` changed they would load without a
    word and compute something else. Files without the entry (peft's) are not checked."""
    path = directory / WEIGHTS_NAME
    if not path.is_file():
        return
    try:
        with safe_open(path, "pt") as weights:
            written = (weights.metadata() or {}).get(SAVED_WITH)
    except (SafetensorError, OSError, ValueError):
        return  # read_adapter_tensors names the damaged file
    if written is None:
        return
    saved_with, now = json.loads(written), _what_it_computes(peft_config)
    differ = sorted(key for key in saved_with.keys() | now.keys() if saved_with.get(key) != now.get(key))
    if differ:
        shown_fields = "; ".join(
            f"{key}: {now.get(key)!r} in {CONFIG_NAME}, {saved_with.get(key)!r} when the weights were saved"
            for key in differ
        )
        raise ValueError(
            f"{CONFIG_NAME} and {WEIGHTS_NAME} come from different saves ({shown_fields}): a save_adapter that was "
            "interrupted between its two files, or a config edited by hand. Save the adapter again from its model "
            "or checkpoint"
        )


def read_adapter_tensors(directory: Path) -> dict[str, torch.Tensor]:
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
        raise ValueError(
            f"{path} is not a readable torch file ({err}); it may be truncated or corrupt"
        ) from None
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


class ModelShapeMismatch(ValueError):
    """The adapter was trained on a model of another depth or width than the one it is loaded
    into. ``trained_on`` and ``this_model`` describe both ("6 encoder and 6 decoder layers and
    d_model 512"), ``base_model`` is the file's base_model_name_or_path (or None), so a caller
    can word its own remedy; the message starts with the plain fact."""

    def __init__(self, directory: Path, trained_on: str, this_model: str, base_model: str | None):
        self.directory, self.trained_on, self.this_model, self.base_model = (
            directory,
            trained_on,
            this_model,
            base_model,
        )
        named = f" (its {CONFIG_NAME} names base_model_name_or_path={base_model!r})" if base_model else ""
        super().__init__(
            f"the adapter in {directory} was trained on a model with {trained_on}; this model has {this_model}. "
            f"Load it into a model of the shape it was trained on{named}"
        )


def _check_same_shape(
    saved: dict[str, torch.Tensor],
    live: dict[str, torch.Tensor],
    directory: Path,
    model: nn.Module,
    config: AdapterConfig,
    base_model: str | None,
) -> None:
    """Refuse, before the per-key checks, an adapter for a deeper or shallower model or a wider
    or narrower one, saying so. Depth per stack is the highest layer index in the names + 1
    (``encoder.block.5.`` -> 6 encoder layers); it counts as different where the file's differs
    from this model's and from what this model's adapter holds (layers_to_transform may leave the
    top layers out). Width: every dimension that is this model's hidden size is one other size in
    the file (``_file_width``)."""
    file_depths = _depths(key.removeprefix(PREFIX) for key in saved)
    live_depths = _depths(key.removeprefix(PREFIX) for key in live)
    model_depths = _depths(f"{name}." for name, _ in model.named_modules())
    stacks = [stack for stack in model_depths if stack in file_depths]  # in the model's order
    deeper = any(file_depths[s] != model_depths[s] and file_depths[s] != live_depths.get(s) for s in stacks)
    width_name, width = _hidden_size(model)
    file_width = _file_width(saved, live, width)
    if not deeper and file_width is None:
        return
    trained_on, this_model = [], []
    if deeper:
        at_least = (
            "at least " if getattr(config, "layers_to_transform", None) else ""
        )  # its top layers may be left out
        trained_on.append(at_least + _layers({stack: file_depths[stack] for stack in stacks}))
        this_model.append(_layers({stack: model_depths[stack] for stack in stacks}))
    if file_width is not None:
        trained_on.append(f"{width_name} {file_width}")
        this_model.append(f"{width_name} {width}")
    raise ModelShapeMismatch(directory, " and ".join(trained_on), " and ".join(this_model), base_model)


def _depths(names: Iterable[str]) -> dict[str, int]:
    """Layers per stack, read from dotted names: the first ``<stack>.<number>.`` segment
    (``encoder.block.3.layer.0...`` -> stack ``encoder.block``, layer 3), highest number + 1."""
    depths: dict[str, int] = {}
    for name in names:
        match = re.match(r"(.*?)\.(\d+)\.", name)
        if match:
            depths[match[1]] = max(depths.get(match[1], 0), int(match[2]) + 1)
    return depths


def _layers(depths: dict[str, int]) -> str:
    """``{"encoder.block": 6, "decoder.block": 6}`` -> ``6 encoder and 6 decoder layers``."""
    parts = [f"{n} {stack.rsplit('.', 1)[0]}" for stack, n in depths.items()]
    return (
        " and ".join(parts) if len(parts) < 3 else ", ".join(parts[:-1]) + " and " + parts[-1]
    ) + " layers"


def _hidden_size(model: nn.Module) -> tuple[str, int | None]:
    config = getattr(model, "config", None)
    for name in ("d_model", "hidden_size"):
        if isinstance(getattr(config, name, None), int):
            return name, getattr(config, name)
    return "hidden size", None


def _file_width(
    saved: dict[str, torch.Tensor], live: dict[str, torch.Tensor], width: int | None
) -> int | None:
    """The file's hidden size where it differs from this model's ``width``: every dimension of a
    shared key that is ``width`` here (lora_A's in_features, lora_B's out_features of q and o, ...)
    has one other size in the file, in two tensors at least. None when they agree or the file
    does not show one other size (one tensor of a wrong shape is the per-key check's to name)."""
    if width is None:
        return None
    sizes: dict[int, set[str]] = {}
    for key, tensor in live.items():
        if key in saved and saved[key].dim() == tensor.dim():
            for dim in range(tensor.dim()):
                if tensor.shape[dim] == width:
                    sizes.setdefault(saved[key].shape[dim], set()).add(key)
    if len(sizes) != 1 or width in sizes:
        return None
    ((size, keys),) = sizes.items()
    return size if len(keys) >= 2 else None


def _check_fits(
    saved: dict[str, torch.Tensor],
    live: dict[str, torch.Tensor],
    directory: Path,
    model: nn.Module,
    config: AdapterConfig,
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
        kind_ok = (
            saved[key].is_floating_point() if tensor.is_floating_point() else saved[key].dtype == tensor.dtype
        )
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


def _non_finite(tensors: dict[str, torch.Tensor]) -> str | None:
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
    name = next(
        (".".join(path[:i]) for i in range(len(path) - 1, 0, -1) if ".".join(path[:i]) in modules), None
    )
    if name is None:
        return f"This model has no module {'.'.join(path[:-1])!r}: was the adapter trained on another architecture?"
    tensor = key.removeprefix(f"{PREFIX}{name}.")
    adapted = {n for n, _ in adapter_layers(model)} | {n for n, _ in trained_copies(model)}
    if not in_file:
        return f"The config adapts {name!r}, but the file has no {tensor!r} for it."
    if name in adapted:
        return f"The file holds {tensor!r} for {name!r}, which this adapter does not have."
    if isinstance(methods.for_config(config), methods.InputMethod):
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

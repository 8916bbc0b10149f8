"""Module surgery: find target layers, swap adapter wrappers in, freeze the rest, and undo it.

Every check runs before the first module is swapped, so a bad config leaves the model as it was.
"""

from __future__ import annotations

import warnings
from collections import Counter
from contextlib import contextmanager
from typing import Iterator, Union

from torch import nn

from peftcore.config import IA3Config, LoRAConfig
from peftcore.ia3 import IA3Scaler
from peftcore.lora import LoRALinear
from peftcore.matching import ends_with, pattern_key, select_copies, select_targets, shown
from peftcore.trained_copy import TrainedCopy
from peftcore.weights import is_linear

AdapterConfig = Union[LoRAConfig, IA3Config]
# The methods that wrap a layer. A new method adds its wrapper here and a branch in _wrap.
ADAPTER_TYPES = (LoRALinear, IA3Scaler)


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, module in model.named_modules():
        if isinstance(module, ADAPTER_TYPES):
            yield name, module


def trained_copies(model: nn.Module) -> Iterator[tuple[str, TrainedCopy]]:
    """The modules_to_save of an injected model, by the name of the module they stand in for."""
    for name, module in model.named_modules():
        if isinstance(module, TrainedCopy):
            yield name, module


def inject(model: nn.Module, config: AdapterConfig, initialise: bool = True) -> nn.Module:
    """Wrap every target layer of ``model`` with the adapter ``config`` describes, in place.

    Afterwards only the adapter and the copies of ``config.modules_to_save`` are trainable.
    ``initialise=False`` builds the adapters without running their init (PiSSA and OLoRA change
    the base weight); ``load_adapter`` checks a file first and initialises after.
    """
    if not isinstance(config, (LoRAConfig, IA3Config)):
        raise TypeError(f"inject takes a LoRAConfig or IA3Config, got {type(config).__name__}")
    existing = next(adapter_layers(model), None) or next(trained_copies(model), None)
    if existing is not None:
        raise ValueError(
            f"the model already has an adapter ({type(existing[1]).__name__} at {existing[0]!r}); "
            "call unload(model) first to inject another one"
        )
    modules = dict(model.named_modules())
    targets = select_targets(model, config)
    not_linear = [f"{n} ({type(modules[n]).__name__})" for n in targets if not is_linear(modules[n])]
    if not_linear:
        raise ValueError(
            f"target_modules must select linear layers; these are not: {not_linear[:5]}. "
            "Name the Linear layers inside them instead (e.g. 'q', 'v', 'wi', 'wo')."
        )
    feedforward = _feedforward(config, targets)
    to_save = select_copies(model, config, targets)
    _warn_unused_patterns(config, targets)

    for param in model.parameters():
        param.requires_grad_(False)
    for name in targets:
        _replace(model, name, _wrap(modules[name], config, name, name in feedforward, initialise))
    for name in to_save:
        _replace(model, name, TrainedCopy(model.get_submodule(name)))
    model.peftcore_config = config
    return model


def _feedforward(config: AdapterConfig, targets: list[str]) -> set[str]:
    """IA3's feed-forward targets: the targets whose name ends with an entry (peft's rule)."""
    entries = getattr(config, "feedforward_modules", None)
    if not entries:
        return set()
    found = {name for name in targets if ends_with(name, entries)}
    for entry in (entries,) if isinstance(entries, str) else entries:
        if not any(ends_with(name, entry if isinstance(entries, str) else (entry,)) for name in targets):
            raise ValueError(
                f"feedforward_modules must be targets too; {entry!r} selects none of the {len(targets)} modules "
                f"that target_modules={shown(config.target_modules)!r} selects"
            )
    return found


def _warn_unused_patterns(config: AdapterConfig, targets: list[str]) -> None:
    """A rank_pattern / alpha_pattern key that matches no target changes nothing (peft >= 0.21 warns too)."""
    for field in ("rank_pattern", "alpha_pattern"):
        unused = [key for key in getattr(config, field, {}) if not any(pattern_key({key: 0}, n) for n in targets)]
        if unused:
            warnings.warn(f"{field} keys {unused} match none of the {len(targets)} adapted modules", stacklevel=3)


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child_name = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child_name, module)


def _wrap(layer: nn.Module, config: AdapterConfig, name: str, feedforward: bool, initialise: bool) -> nn.Module:
    if isinstance(config, LoRAConfig):
        r, alpha = config.rank_and_alpha(name)
        return LoRALinear(layer, r, alpha, config.dropout, config.init, config.use_rslora, initialise)
    return IA3Scaler(layer, feedforward=feedforward)


def merge(model: nn.Module) -> None:
    """Fold every adapter into its base weight; forward then costs what the base model costs."""
    _untie_merged_bases(model)
    for _, layer in adapter_layers(model):
        layer.merge()


def _untie_merged_bases(model: nn.Module) -> None:
    """A base whose weight is shared (T5's lm_head is tied to the input embeddings) gets its own
    copy before a merge: merging into the shared tensor would change the embeddings too."""
    owners = Counter(id(p) for m in model.modules() for p in m.parameters(recurse=False))
    for name, layer in adapter_layers(model):
        weight = getattr(layer.base, "weight", None)
        if isinstance(weight, nn.Parameter) and owners[id(weight)] > 1 and not layer.merged:
            layer.base.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
            warnings.warn(
                f"{name} shares its weight with another module (tied embeddings); merging gave it its own copy so "
                "the other module is unchanged. transformers re-ties T5's lm_head when it loads a saved model, so "
                "keep this layer's adapter unmerged (save_adapter) if you want to reload the merged model.",
                stacklevel=3,
            )


def unmerge(model: nn.Module) -> None:
    """Undo ``merge`` (exact up to float rounding on full-precision bases)."""
    for _, layer in adapter_layers(model):
        layer.unmerge()


def unload(model: nn.Module, merge: bool = True) -> nn.Module:
    """Replace each wrapper by its base layer: with ``merge`` the adapter is folded in first and
    each module to save is replaced by its trained copy (as peft's merge_and_unload does); without
    it the adapter and the copies are dropped (an NF4 base stays NF4). Returns the plain model."""
    if merge:
        _untie_merged_bases(model)
    for name, layer in list(adapter_layers(model)):
        if merge:
            layer.fold_into_base() if isinstance(layer, IA3Scaler) else layer.merge()
        elif layer.merged:
            layer.unmerge()
        _replace(model, name, layer.base)
    for name, saved in list(trained_copies(model)):  # merged: the trained copy stays; else the original
        _replace(model, name, saved.trained if merge else saved.original)
    if "peftcore_config" in model.__dict__:
        del model.peftcore_config
    return model


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model alone inside the block (e.g. to score the untuned model)."""
    layers = [layer for _, layer in adapter_layers(model)] + [saved for _, saved in trained_copies(model)]
    merged = [name for name, layer in adapter_layers(model) if layer.merged]
    if merged:
        raise RuntimeError(f"adapters are merged (e.g. {merged[0]!r}); call unmerge(model) before disabling them")
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer in layers:
            layer.disabled = False

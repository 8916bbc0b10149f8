"""Module surgery: find target layers, swap adapter wrappers in, freeze the rest, and undo it.

Every check runs before the first module is swapped, so a bad config leaves the model as it was.
"""

from __future__ import annotations

import difflib
import re
import warnings
from collections import Counter
from contextlib import contextmanager
from typing import Iterator, Union

from torch import nn

from peftcore.config import IA3Config, LoRAConfig, TargetModules
from peftcore.ia3 import IA3Scaler
from peftcore.lora import LoRALinear

AdapterConfig = Union[LoRAConfig, IA3Config]
# The methods that wrap a layer. A new method adds its wrapper here and a branch in _wrap.
ADAPTER_TYPES = (LoRALinear, IA3Scaler)


def matches(name: str, targets: TargetModules) -> bool:
    """peft's rule: a regex string must match the whole dotted name; a list entry must equal the
    name or its tail after a dot (``"q"`` matches ``encoder.block.0.layer.0.SelfAttention.q``)."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def is_linear(module: nn.Module) -> bool:
    """A layer an adapter can wrap: nn.Linear, or a quantized stand-in with the same interface."""
    return isinstance(module, nn.Linear) or hasattr(module, "dequantize") and hasattr(module, "in_features")


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, module in model.named_modules():
        if isinstance(module, ADAPTER_TYPES):
            yield name, module


def find_targets(model: nn.Module, targets: TargetModules, field: str = "target_modules") -> list[str]:
    """Dotted names of the modules that ``targets`` selects; raises if a target selects nothing."""
    names = [name for name, _ in model.named_modules() if name]
    found = [name for name in names if matches(name, targets)]
    if isinstance(targets, str):
        unmatched = [] if found else [targets]
    else:
        unmatched = [t for t in targets if not any(matches(n, (t,)) for n in names)]
    if unmatched:
        leaves = sorted({name.rsplit(".", 1)[-1] for name in names})
        closest = difflib.get_close_matches(str(unmatched[0]), leaves, n=1)
        hint = f" Closest match: {closest[0]!r}." if closest else ""
        raise ValueError(
            f"{field} {unmatched[0]!r} matches no module in {type(model).__name__}.{hint} "
            f"Module names that exist (last part of the dotted name): {leaves}"
        )
    return found


def inject(model: nn.Module, config: AdapterConfig) -> nn.Module:
    """Wrap every target layer of ``model`` with the adapter ``config`` describes, in place.

    Afterwards only the adapter and ``config.modules_to_save`` are trainable.
    """
    if not isinstance(config, (LoRAConfig, IA3Config)):
        raise TypeError(f"inject takes a LoRAConfig or IA3Config, got {type(config).__name__}")
    existing = next(adapter_layers(model), None)
    if existing is not None:
        raise ValueError(
            f"the model already has an adapter ({type(existing[1]).__name__} at {existing[0]!r}); "
            "call unload(model) first to inject another one"
        )
    modules = dict(model.named_modules())
    targets = find_targets(model, config.target_modules)
    not_linear = [f"{n} ({type(modules[n]).__name__})" for n in targets if not is_linear(modules[n])]
    if not_linear:
        raise ValueError(
            f"target_modules must select linear layers; these are not: {not_linear[:5]}. "
            "Name the Linear layers inside them instead (e.g. 'q', 'v', 'wi', 'wo')."
        )
    feedforward: set[str] = set()
    if isinstance(config, IA3Config) and config.feedforward_modules:
        feedforward = set(find_targets(model, config.feedforward_modules, "feedforward_modules"))
        stray = sorted(feedforward - set(targets))
        if stray:
            raise ValueError(
                f"feedforward_modules must be targets too; {stray[:5]} are not selected by "
                f"target_modules={config.target_modules!r}"
            )
    to_save = find_targets(model, config.modules_to_save, "modules_to_save") if config.modules_to_save else []

    for param in model.parameters():
        param.requires_grad_(False)
    for name in targets:
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child_name, _wrap(modules[name], config, feedforward=name in feedforward))
    for name in to_save:
        for param in model.get_submodule(name).parameters():
            param.requires_grad_(True)
    model.peftcore_config = config
    return model


def _wrap(layer: nn.Module, config: AdapterConfig, feedforward: bool) -> nn.Module:
    if isinstance(config, LoRAConfig):
        return LoRALinear.from_config(layer, config)
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
    """Replace each wrapper by its base layer: with ``merge`` the adapter is folded in first,
    without it the adapter is dropped (an NF4 base stays NF4). Returns the plain model."""
    if merge:
        _untie_merged_bases(model)
    for name, layer in list(adapter_layers(model)):
        if merge:
            layer.fold_into_base() if isinstance(layer, IA3Scaler) else layer.merge()
        elif layer.merged:
            layer.unmerge()
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child_name, layer.base)
    if "peftcore_config" in model.__dict__:
        del model.peftcore_config
    return model


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model alone inside the block (e.g. to score the untuned model)."""
    layers = [layer for _, layer in adapter_layers(model)]
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

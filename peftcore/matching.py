"""Which modules a config field selects, by peft's rule for that field, so a peft config means
the same thing here. Each rule is one function; nothing else in peftcore matches names.

    target_modules, exclude_modules   a list entry equals the dotted name or its tail after a dot
                                      ("q" selects "encoder.block.0.layer.0.SelfAttention.q");
                                      a string is a regex for the whole name; "all-linear" is every
                                      linear layer (nn.Linear, GPT-2's Conv1D) except the output
                                      head (lm_head)
    modules_to_save,                  a plain suffix, no dot boundary ("o" also selects "wo",
    IA3 feedforward_modules           "layer_norm" also "final_layer_norm"); feedforward_modules
                                      as a string is a regex for the whole name
    rank_pattern, alpha_pattern       each key is a regex for a dotted tail of the name,
                                      re.match(rf"(.*\\.)?({key})$", name); the first key that matches wins
    layers_to_transform               the layer index is the number after one of layers_pattern
                                      ("block.3." -> 3) or, without a pattern, the first
                                      "<name>.<number>." segment (peft >= 0.20; peft_format keeps <= 0.19's)
"""

from __future__ import annotations

import difflib
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import nn

from peftcore.weights import is_linear, is_quantized

# A tuple of names matched against the end of a module's dotted name, or one regex string
# matched against the whole dotted name (peft's two conventions).
TargetModules = tuple[str, ...] | str

ALL_LINEAR = "all-linear"


def matches(name: str, targets: TargetModules) -> bool:
    """peft's rule for target_modules and exclude_modules (``all-linear`` is resolved by the caller)."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def ends_with(name: str, suffixes: TargetModules) -> bool:
    """peft's rule for modules_to_save and IA3's feedforward_modules: a plain string suffix."""
    if isinstance(suffixes, str):
        return re.fullmatch(suffixes, name) is not None
    return any(name.endswith(s) for s in suffixes)


def inside(name: str, modules: Sequence[str]) -> str | None:
    """The entry of ``modules`` (modules_to_save) that ``name`` is, or lies within, by peft's
    rule for keeping adapters off those modules; None when there is none."""
    return next((m for m in modules if re.match(rf"(^|.*\.){m}($|\..*)", name)), None)


def pattern_key(patterns: Mapping[str, object], name: str) -> str | None:
    """The first key of rank_pattern / alpha_pattern that matches ``name``, or None."""
    return next((key for key in patterns if re.match(rf"(.*\.)?({key})$", name)), None)


def layer_index(name: str, layers_pattern: Sequence[str] | None) -> int | None:
    """The layer number of ``name`` that layers_to_transform is compared with (peft >= 0.20):
    the number after one of ``layers_pattern``, or else the first numbered segment
    (``encoder.block.3.layer.0.SelfAttention.q`` -> 3). peft_format keeps older peft's rule."""
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(\d+)\.", name)
    else:
        match = next((m for p in layers_pattern if (m := re.match(rf"(?:^|.*?\.){p}\.(\d+)\.", name))), None)
    return int(match.group(1)) if match else None


# A layer_index rule: (dotted name, layers_pattern) -> the layer number, or None.
LayerIndex = Callable[[str, Sequence[str] | None], int | None]


# --- over a model ---------------------------------------------------------------------------


def _every_entry_matches(
    model: nn.Module, names: list[str], entries: TargetModules, field: str, rule
) -> None:
    """Raise, naming the closest module name, when an entry of ``field`` selects no module by ``rule``."""
    singles = [entries] if isinstance(entries, str) else [(entry,) for entry in entries]
    unmatched = [s if isinstance(s, str) else s[0] for s in singles if not any(rule(n, s) for n in names)]
    if unmatched:
        leaves = sorted({name.rsplit(".", 1)[-1] for name in names})
        closest = difflib.get_close_matches(str(unmatched[0]), leaves, n=1)
        hint = f" Closest match: {closest[0]!r}." if closest else ""
        raise ValueError(
            f"{field} {unmatched[0]!r} matches no module in {type(model).__name__}.{hint} "
            f"Module names that exist (last part of the dotted name): {leaves}"
        )


def resolve_targets(model: nn.Module, targets: TargetModules) -> TargetModules:
    """``all-linear`` becomes the full names of every linear layer (nn.Linear, Conv1D, NF4Linear)
    except the output head, as in peft."""
    if not (isinstance(targets, str) and targets.lower() == ALL_LINEAR):
        return targets
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    found = tuple(name for name, m in model.named_modules() if name and is_linear(m) and m is not head)
    if not found:
        kinds = sorted(
            {type(m).__name__ for name, m in model.named_modules() if name and hasattr(m, "weight")}
        )
        raise ValueError(
            f"target_modules='all-linear' selects nothing: the model has no linear layer (nn.Linear or "
            f"transformers' Conv1D) besides its output head (its layers with weights are {kinds})"
        )
    return found


def why_not_selected(
    name: str, config: Any, targets: TargetModules, layer_rule: LayerIndex = layer_index
) -> str | None:
    """None when ``config`` adapts the module ``name``; otherwise the field that leaves it out.
    The checks run in peft's order: excluded, inside a module to save, targeted, in a chosen layer."""
    if config.exclude_modules and matches(name, config.exclude_modules):
        return f"exclude_modules={shown(config.exclude_modules)} excludes it"
    saved = inside(name, config.modules_to_save)
    if saved is not None:
        return f"it lies in modules_to_save entry {saved!r}, which trains in full instead"
    if not matches(name, targets):
        return f"target_modules={shown(config.target_modules)} does not select it"
    layers = getattr(config, "layers_to_transform", None)
    if layers is not None and name not in targets:  # a full name in the list bypasses the layer filter (peft)
        pattern = config.layers_pattern
        index = layer_rule(name, pattern)
        if index is None:
            return f"layers_pattern={shown(pattern)} finds no layer index in its name"
        if index not in layers:
            return f"layers_to_transform={list(layers)} leaves out its layer {index}"
    return None


def shown(value: object) -> object:
    return list(value) if isinstance(value, tuple) else value


def select_targets(model: nn.Module, config: Any, layer_rule: LayerIndex = layer_index) -> list[str]:
    """Dotted names of the layers ``config`` adapts; raises if a target entry selects nothing."""
    names = [name for name, _ in model.named_modules() if name]
    targets = resolve_targets(model, config.target_modules)
    _every_entry_matches(model, names, targets, "target_modules", matches)
    if config.exclude_modules and not any(matches(n, config.exclude_modules) for n in names):
        warnings.warn(f"exclude_modules={shown(config.exclude_modules)} matches no module", stacklevel=3)
    reasons = {
        name: why_not_selected(name, config, targets, layer_rule) for name in names if matches(name, targets)
    }
    selected = [name for name, reason in reasons.items() if reason is None]
    if not selected:
        first = next(iter(reasons))
        raise ValueError(f"the config adapts no module: {first!r} is targeted, but {reasons[first]}")
    return selected


def never_called(model: nn.Module, name: str) -> str | None:
    """Why a trained copy of module ``name`` would never run, or None.

    An encoder-decoder's shared token embedding (T5's ``shared``, BART's ``model.shared``, and
    mT5, UMT5, mBART, Pegasus ...) is never called by that name: the encoder and the decoder look
    tokens up through their own ``embed_tokens``, which is the same module (BART) or shares its
    weight (T5). A copy put in its place therefore trains nothing (peft accepts it and does just
    that).
    """
    parent_name, _, attribute = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    module = getattr(parent, attribute, None)
    if attribute == "embed_tokens" or not isinstance(module, nn.Embedding):
        return None
    stacks = [getattr(getattr(parent, side, None), "embed_tokens", None) for side in ("encoder", "decoder")]
    if not any(e is not None and (e is module or e.weight is module.weight) for e in stacks):
        return None
    return (
        f"a copy of the shared embedding {name!r} is never used in forward (the encoder and decoder look tokens "
        "up through their own embed_tokens, which share its weight), so it would train nothing (peft accepts it "
        "and does just that). Name 'embed_tokens' to train the input embeddings (the encoder and decoder each "
        "get a copy, as in peft) and/or 'lm_head' for the output projection"
    )


def select_copies(model: nn.Module, config: Any, targets: list[str]) -> list[str]:
    """Dotted names of the modules_to_save (peft's plain-suffix rule); refuses the ones whose copy
    would be ill-defined or never used."""
    if not config.modules_to_save:
        return []
    names = [name for name, _ in model.named_modules(remove_duplicate=False) if name]
    _every_entry_matches(model, names, config.modules_to_save, "modules_to_save", ends_with)
    found = [name for name in names if ends_with(name, config.modules_to_save)]
    modules = dict(model.named_modules(remove_duplicate=False))
    for name in found:
        trap = never_called(model, name)
        if trap:
            raise ValueError(f"modules_to_save={list(config.modules_to_save)} selects {name!r}: {trap}")
        outer = next((other for other in found if name.startswith(other + ".")), None)
        if outer:
            raise ValueError(
                f"modules_to_save={list(config.modules_to_save)} selects both {outer!r} and {name!r}, which lies "
                "inside it; name only the outer module"
            )
        adapted = next((t for t in targets if t == name or t.startswith(name + ".")), None)
        if adapted:
            raise ValueError(
                f"modules_to_save={list(config.modules_to_save)} selects {name!r} (a plain suffix match, as in peft), "
                f"but target_modules adapts {adapted!r} there; a module is either adapted or trained in full"
            )
        if any(is_quantized(m) for m in modules[name].modules()):
            raise ValueError(
                f"modules_to_save selects {name!r}, which is quantized; a 4-bit module cannot train in full"
            )
    return found

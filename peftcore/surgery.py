"""Module surgery: swap adapter wrappers (and 4-bit layers) in, freeze the rest, and undo it.

Every check runs before the first module is swapped, so a bad config leaves the model as it was.
Which modules a config selects is decided in matching.py; what each method does, in its own
class, found through peftcore.methods.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from torch import nn

from peftcore import adapters, families, methods
from peftcore.config import NF4Config
from peftcore.contract import AdapterLayer, InputMethod
from peftcore.matching import matches, select_copies, select_targets
from peftcore.nf4 import QUANTIZABLE_DTYPES, NF4Linear
from peftcore.trained_copy import TrainedCopy
from peftcore.weights import is_linear, is_transposed

AdapterConfig = Any  # one of methods.config_classes()


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Every method's modules in ``model``: its layer wrappers, or its input transform."""
    types = methods.layer_types()
    for name, module in model.named_modules():
        if isinstance(module, types):
            yield name, module


def wrapped_layers(model: nn.Module) -> Iterator[tuple[str, AdapterLayer]]:
    """The layer methods' wrappers in ``model`` (adapter_layers without an input method's module)."""
    for name, layer in adapter_layers(model):
        if isinstance(layer, AdapterLayer):
            yield name, layer


def trained_copies(model: nn.Module) -> Iterator[tuple[str, TrainedCopy]]:
    """The modules_to_save of an injected model, by the name of the module they stand in for."""
    for name, module in model.named_modules():
        if isinstance(module, TrainedCopy):
            yield name, module


def inject(
    model: nn.Module, config: AdapterConfig, initialise: bool = True, name: str | None = None
) -> nn.Module:
    """Give ``model`` the adapter ``config`` describes, in place.

    Afterwards only the adapter and the copies of ``config.modules_to_save`` are trainable.
    ``initialise=False`` builds the adapters without running their init (PiSSA and OLoRA change
    the base weight); ``load_adapter`` checks a file first and initialises after. ``name`` names
    the adapter (peftcore.adapters); into a model that has one already, a named adapter is added
    beside it, inactive and frozen (peft's ``add_adapter``).
    """
    method = methods.for_config(config)
    existing = next(adapter_layers(model), None) or next(trained_copies(model), None)
    if existing is not None and name is not None:
        adapters.add_adapter(model, config, name, lambda bare: inject(bare, config, initialise))
        return model
    if existing is not None:
        raise ValueError(
            f"the model already has an adapter ({type(existing[1]).__name__} at {existing[0]!r}); "
            "call unload(model) first to inject another one, or give it a name to add it beside "
            "(inject(model, config, name=...))"
        )
    _inject(model, method, config, initialise)
    if name is not None:
        adapters.name_injected(model, name)
    return model


def _inject(model: nn.Module, method: methods.Method, config: AdapterConfig, initialise: bool) -> None:
    if isinstance(method, InputMethod):
        for param in model.parameters():
            param.requires_grad_(False)
        method.install(model, config, initialise)
        model.peftcore_config = config
        return

    modules = dict(model.named_modules())
    targets = select_targets(model, config)
    not_linear = [f"{n} ({type(modules[n]).__name__})" for n in targets if not is_linear(modules[n])]
    if not_linear:
        raise ValueError(
            f"target_modules must select linear layers (nn.Linear, transformers' Conv1D); these are not: "
            f"{not_linear[:5]}. Name the linear layers inside them instead (e.g. T5's 'q', 'v', 'wi', 'wo')."
        )
    method.check(config, {name: modules[name] for name in targets})
    to_save = select_copies(model, config, targets)
    _say_if_the_head_is_frozen(model, to_save)

    for param in model.parameters():
        param.requires_grad_(False)
    for name in targets:
        replace_module(model, name, method.wrap(modules[name], config, name, initialise))
    for name in to_save:
        replace_module(model, name, TrainedCopy(model.get_submodule(name)))
    model.peftcore_config = config


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` where the model holds the module named ``name``."""
    parent_name, _, child_name = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child_name, module)


def _say_if_the_head_is_frozen(model: nn.Module, to_save: list[str]) -> None:
    """A sequence classifier's head is new and random: peft trains it in full by default (its
    SEQ_CLS modules_to_save); here it trains only when named, so a frozen one is said out loud."""
    if families.task_type(model) != "SEQ_CLS":
        return
    heads = [n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] in families.CLASSIFICATION_HEADS]
    if heads and not any(h == n or h.startswith(n + ".") for h in heads for n in to_save):
        warnings.warn(
            f"the classification head {heads[0]!r} stays frozen (at its initialisation): add "
            f"modules_to_save=({heads[0].rsplit('.', 1)[-1]!r},) to train it in full, as peft's task_type "
            "SEQ_CLS does by default",
            stacklevel=3,
        )


def quantize(model: nn.Module, config: NF4Config, keep: Sequence[str] = ()) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` by an :class:`NF4Linear`, in place; a transformers
    ``Conv1D`` (GPT-2's) becomes one too, made from its transposed weight, as transformers does when
    it loads such a model in 4 bit, so the model computes the same.

    Linears matched by ``config.skip_modules`` (target_modules' rule: a dotted suffix, or one
    regex) stay as they are; ``skip_modules=None`` means the model family's
    ``keep_in_full_precision`` (``peftcore.families``: ``lm_head``, and T5's ``wo``) plus the model's
    own ``_keep_in_fp32_modules``. ``keep`` names modules (full dotted names) to leave as they are
    too: LoftQ's targets, which ``inject`` quantizes itself. Everything is validated and quantized
    before the first swap, so an error leaves the model unchanged.
    """
    if not isinstance(config, NF4Config):
        raise TypeError(f"quantize() needs an NF4Config, got {type(config).__name__}")
    if isinstance(model, nn.Linear) or is_transposed(model):
        raise TypeError(
            "quantize() replaces the Linear layers inside a model; for one layer use NF4Linear.from_linear"
        )
    done = [name for name, module in model.named_modules() if isinstance(module, NF4Linear)]
    if done:
        raise ValueError(
            f"the model is already quantized: it contains {len(done)} NF4Linear layers (e.g. '{done[0]}'). "
            "Quantizing twice would re-quantize 4-bit weights; call quantize() once, on a full-precision model"
        )
    skip = _skip_list(model, config)
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if (isinstance(module, nn.Linear) or is_transposed(module))
        and not matches(name, skip)
        and name not in keep
    ]
    for name, module in targets:
        if module.weight.dtype not in QUANTIZABLE_DTYPES:
            raise ValueError(
                f"cannot quantize '{name}': its weight is {module.weight.dtype}, NF4 needs float32, bfloat16 or "
                f"float16. Convert the model to a floating dtype first, or add '{name.rsplit('.', 1)[-1]}' to "
                "NF4Config.skip_modules to keep it as it is"
            )
    if not targets and not keep:
        raise ValueError(f"found no nn.Linear (or Conv1D) to quantize (skip_modules={skip!r})")
    replacements = [(name, NF4Linear.from_linear(module, config)) for name, module in targets]
    for name, layer in replacements:
        replace_module(model, name, layer)
    return model


def _skip_list(model: nn.Module, config: NF4Config) -> Sequence[str] | str:
    if config.skip_modules is not None:
        return config.skip_modules
    own = getattr(model, "_keep_in_fp32_modules", None) or ()
    return tuple(dict.fromkeys((*families.of(model).keep_in_full_precision, *own)))


def merge(model: nn.Module) -> None:
    """Fold every adapter into its base weight; forward then costs what the base model costs.
    An input method's module is not a weight: merging it is refused, saying why."""
    _refuse_merging_inputs(model)
    _untie_merged_bases(model)
    for _, layer in wrapped_layers(model):
        layer.merge()


def _refuse_merging_inputs(model: nn.Module) -> None:
    for _, layer in adapter_layers(model):
        method = methods.for_layer(layer)
        if isinstance(method, InputMethod):
            method.refuse_merge()


def _untie_merged_bases(model: nn.Module) -> None:
    """A base whose weight is shared (T5's lm_head is tied to the input embeddings) gets its own
    copy before a merge: merging into the shared tensor would change the embeddings too."""
    owners = Counter(id(p) for m in model.modules() for p in m.parameters(recurse=False))
    for name, layer in wrapped_layers(model):
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
    for _, layer in wrapped_layers(model):
        layer.unmerge()


def unload(model: nn.Module, merge: bool = True) -> nn.Module:
    """Take the adapter out: each wrapper is replaced by its base layer (with ``merge``, after
    folding the adapter in) and an input transform is removed; each module to save becomes its
    trained copy with ``merge`` (as peft's merge_and_unload does) and its original without. Without
    ``merge`` an NF4 base stays NF4. Returns the plain model."""
    if merge:
        _refuse_merging_inputs(model)
        _untie_merged_bases(model)
    for name, layer in list(adapter_layers(model)):
        method = methods.for_layer(layer)
        if isinstance(method, InputMethod):
            method.remove(model, layer)
            continue
        if merge:
            layer.fold_into_base()
        elif layer.merged:
            layer.unmerge()
        replace_module(model, name, layer.base)
    for name, saved in list(trained_copies(model)):  # merged: the trained copy stays; else the original
        replace_module(model, name, saved.trained if merge else saved.original)
    if "peftcore_config" in model.__dict__:
        del model.peftcore_config
    adapters.forget(model)  # the inactive named adapters go with it
    return model


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model alone inside the block (e.g. to score the untuned model)."""
    adapters.refuse_in_rows(model, "disable_adapters")  # rows naming '__base__' run the base there
    layers = [layer for _, layer in adapter_layers(model)] + [saved for _, saved in trained_copies(model)]
    merged = [name for name, layer in wrapped_layers(model) if layer.merged]
    if merged:
        raise RuntimeError(
            f"adapters are merged (e.g. {merged[0]!r}); call unmerge(model) before disabling them"
        )
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer in layers:
            layer.disabled = False

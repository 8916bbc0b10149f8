"""Several named adapters on one base, as peft has them: one active (it computes and trains), the
others kept beside the model, frozen; and a mixed batch in which each row names its adapter.

    inject(model, config, name="b")          a second adapter: added inactive and frozen (peft's add_adapter)
    load_adapter(model, path, name="b")      the same from a file
    set_adapter(model, "b")                  "b" computes and trains; the others are frozen
    delete_adapter(model, "b")
    adapter_names(model), active_adapter(model)
    save_adapter(model, path)                each adapter: "default" at the top, the others in path/<name>/
    with adapter_rows(model, ["a", "__base__", "b"]):   row i computed with its adapter ("__base__": none),
        model(**batch); model.generate(...)             peft's adapter_names=, for LoRA, DoRA and IA3

The active adapter's layers stand in the model where its targets were, exactly as a single
adapter's do, so everything that reads one adapter (merge, counts, checkpoints, the CLI) reads the
active one. An inactive adapter is its config and its layers by module name, each layer holding
the same base module the model holds: switching is swapping modules, no tensor is copied. A
mixed batch puts a ``RowDispatch`` at every module any adapter targets for the duration of the
block: the base runs on the whole batch, then each adapter's layer on its rows
(``AdapterLayer.forward_rows``; LoRA adds ``s B A x`` to the base's rows, as peft does). Under
beam search a batch has k rows per input (generate repeats each input k times, consecutively),
and each input's name covers its k rows.

Adapters that change the base (PiSSA, OLoRA, LoRA-GA, LoftQ) cannot share it and are refused
next to another adapter, as are input methods (a soft prompt, a prefix) and modules_to_save.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

# surgery imports this module too; its functions are looked up when called, so the cycle is harmless
from peftcore import methods, surgery
from peftcore.contract import AdapterLayer, InputMethod

__all__ = [
    "BASE_ROW",
    "DEFAULT",
    "RowDispatch",
    "active_adapter",
    "adapter_names",
    "adapter_rows",
    "add_adapter",
    "delete_adapter",
    "set_adapter",
]

DEFAULT = "default"  # the name of an adapter injected without one (peft's)
BASE_ROW = "__base__"  # a mixed batch's name for a row computed by the base model alone (peft's)


@dataclass
class Adapter:
    """One named adapter: its config and its layers by module name."""

    config: object
    layers: dict[str, AdapterLayer] = field(default_factory=dict)


def _registry(model: nn.Module) -> dict[str, Adapter]:
    """The model's adapters by name, the active one's layers read from the model."""
    registry = model.__dict__.get("peftcore_adapters")
    config = getattr(model, "peftcore_config", None)
    if registry is None:
        if config is None:
            return {}
        registry = {DEFAULT: Adapter(config)}
        model.peftcore_adapters, model.peftcore_active = registry, DEFAULT
    active = registry[model.peftcore_active]
    active.config = config
    active.layers = dict(surgery.wrapped_layers(model))
    return registry


def adapter_names(model: nn.Module) -> list[str]:
    """The model's adapters, in the order they were added."""
    return list(_registry(model))


def active_adapter(model: nn.Module) -> str | None:
    """The adapter that computes and trains (None for a model without one)."""
    return model.peftcore_active if _registry(model) else None


def name_injected(model: nn.Module, name: str) -> None:
    """Name the model's only adapter (``inject``/``load_adapter`` on a bare model with ``name``)."""
    check_name(name)
    config = model.peftcore_config
    model.peftcore_adapters, model.peftcore_active = {name: Adapter(config)}, name
    _registry(model)


def check_name(name: object) -> None:
    if not isinstance(name, str) or not name or name == BASE_ROW or "/" in name or name.startswith("."):
        raise ValueError(
            f"an adapter name must be a non-empty string, not {BASE_ROW!r}, without '/' and not starting with '.' "
            f"(it names a folder when saved), got {name!r}"
        )


def check_addable(model: nn.Module, config: object, name: str) -> None:
    """Refuse what cannot sit beside the model's adapters, before anything changes."""
    check_name(name)
    refuse_in_rows(model, "adding an adapter")
    registry = _registry(model)
    if name in registry:
        raise ValueError(f"the model already has an adapter named {name!r}; its adapters: {list(registry)}")
    for held_name, held in [("the new adapter", config), *((n, a.config) for n, a in registry.items())]:
        method = methods.for_config(held)
        if isinstance(method, InputMethod):
            raise ValueError(
                f"{held_name} ({type(held).__name__}) is an input method: several named adapters are for layer "
                "methods (LoRA, DoRA, IA3)"
            )
        if getattr(held, "modules_to_save", ()):
            raise ValueError(
                f"{held_name} trains modules_to_save {list(held.modules_to_save)}: several named adapters cannot "
                "share those modules; train them without modules_to_save"
            )
        init = getattr(held, "init", None)
        if isinstance(init, str) and (init.startswith("pissa") or init in ("olora", "lora_ga", "loftq")):
            raise ValueError(
                f"{held_name} has init={init!r}, which rewrites the base weight that the adapters share: use it as "
                "the only adapter, or another init"
            )
    merged = [n for n, layer in registry[model.peftcore_active].layers.items() if layer.merged]
    if merged:
        raise ValueError(f"the active adapter is merged (e.g. {merged[0]!r}): unmerge(model) first")


def add_adapter(model: nn.Module, config: object, name: str, place: Callable[[nn.Module], object]) -> None:
    """Add an inactive adapter ``name``: ``place(model)`` puts it into the bare model (inject or
    load_adapter); it is then set aside, frozen, and the active adapter put back."""
    check_addable(model, config, name)
    registry = _registry(model)
    active = model.peftcore_active
    _take_out(model, registry[active])
    try:
        place(model)
        added = Adapter(model.peftcore_config, dict(surgery.wrapped_layers(model)))
        _take_out(model, added)
    except BaseException:
        _take_out(model, Adapter(None, dict(surgery.wrapped_layers(model))))
        model.peftcore_adapters = registry  # a refused load unloads, which forgets the names
        _put_in(model, registry[active], active)
        raise
    registry[name] = added
    _put_in(model, registry[active], active)
    _freeze(added)


def set_adapter(model: nn.Module, name: str) -> None:
    """Make ``name`` the adapter that computes and trains; the others are frozen."""
    registry = _registry(model)
    if name not in registry:
        raise ValueError(f"no adapter named {name!r}; the model's adapters: {list(registry)}")
    current = model.peftcore_active
    if name == current:
        return
    refuse_in_rows(model, "set_adapter")
    if any(layer.merged for layer in registry[current].layers.values()):
        raise ValueError(f"the active adapter {current!r} is merged: unmerge(model) first")
    if any(layer.disabled for layer in registry[current].layers.values()):
        raise ValueError("set_adapter inside disable_adapters(model): leave the block first")
    for path, layer in registry[name].layers.items():  # every swap possible before any is made
        held, outgoing = model.get_submodule(path), registry[current].layers.get(path)
        if held is not layer.base and (outgoing is None or outgoing.base is not layer.base):
            raise RuntimeError(
                f"{path!r} holds another module than adapter {name!r}'s base: the model was changed"
            )
    reference = next(
        (p for layer in registry[current].layers.values() for p in layer.adapter_params().values()), None
    )
    _take_out(model, registry[current])
    _freeze(registry[current])
    _put_in(model, registry[name], name)
    for layer in registry[name].layers.values():
        _follow(model, layer, reference)
        for param in layer.adapter_params().values():
            param.requires_grad_(True)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name``. Deleting the active one activates the first remaining by name (as
    peft does); deleting the last leaves the bare model."""
    refuse_in_rows(model, "delete_adapter")
    registry = _registry(model)
    if name not in registry:
        raise ValueError(f"no adapter named {name!r}; the model's adapters: {list(registry)}")
    if name != model.peftcore_active:
        del registry[name]
        return
    if len(registry) == 1:
        surgery.unload(model, merge=False)
        return
    set_adapter(model, sorted(n for n in registry if n != name)[0])
    del registry[name]


def forget(model: nn.Module) -> None:
    """Drop the named adapters' records (unload: the model is bare again)."""
    for key in ("peftcore_adapters", "peftcore_active"):
        model.__dict__.pop(key, None)


@contextmanager
def active(model: nn.Module, name: str) -> Iterator[None]:
    """Inside the block, ``name`` is the active adapter (save and load use it); then the previous one."""
    previous = model.peftcore_active
    flags = {id(p): p.requires_grad for p in model.parameters()}
    set_adapter(model, name)
    try:
        yield
    finally:
        set_adapter(model, previous)
        for adapter in _registry(model).values():
            for layer in adapter.layers.values():
                for param in layer.adapter_params().values():
                    param.requires_grad_(flags.get(id(param), param.requires_grad))


# --- a mixed batch ------------------------------------------------------------------------------


class RowDispatch(nn.Module):
    """Stands at one target during a mixed batch: the base on every row, then each adapter's layer
    on the rows that name it (rows naming ``__base__`` or an adapter without this target keep the
    base's output)."""

    def __init__(self, base: nn.Module, layers: dict[str, AdapterLayer], rows: list[str]) -> None:
        super().__init__()
        self.base = base
        self.layers = layers  # a plain dict: the layers stay registered where they live
        self.rows = rows

    @property
    def weight(self):  # what model code reads from the linear layer it replaced (T5: wo.weight.dtype)
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] % len(self.rows):
            raise ValueError(
                f"a batch of {x.shape[0]} rows, {len(self.rows)} adapter names: one name per input"
            )
        copies = x.shape[0] // len(self.rows)  # generate's beams: each input repeated consecutively
        names = [name for name in self.rows for _ in range(copies)]
        result = self.base(x)
        for name, layer in self.layers.items():
            index = [i for i, n in enumerate(names) if n == name]
            if index:
                rows = torch.tensor(index, device=x.device)
                result = result.index_copy(
                    0, rows, layer.forward_rows(x[rows], result[rows]).to(result.dtype)
                )
        return result


@contextmanager
def adapter_rows(model: nn.Module, names: Sequence[str]) -> Iterator[nn.Module]:
    """Inside the block, row i of every batch is computed with adapter ``names[i]`` (``__base__``:
    the base model alone): peft's ``adapter_names=`` for ``forward`` and ``generate``."""
    registry = _registry(model)
    names = list(names)
    unknown = sorted({n for n in names if n not in registry and n != BASE_ROW})
    if not names or unknown:
        raise ValueError(
            f"adapter names {unknown or names!r}: each row names one of the model's adapters {list(registry)} or "
            f"{BASE_ROW!r}"
        )
    if model.training:
        raise ValueError("a mixed batch is for inference: call model.eval() first (as peft requires)")
    active_layers = list(registry[model.peftcore_active].layers.values())
    if any(layer.merged for layer in active_layers):
        raise ValueError("the active adapter is merged: unmerge(model) first")
    if any(layer.disabled for layer in active_layers):
        raise ValueError("adapter_rows inside disable_adapters(model): rows naming '__base__' run the base")
    refuse_in_rows(model, "adapter_rows")
    reference = next((p for layer in active_layers for p in layer.adapter_params().values()), None)
    modules = dict(model.named_modules())
    paths = {path for adapter in registry.values() for path in adapter.layers}
    placed, hooks = {}, []
    try:
        for path in sorted(paths):
            held = modules[path]
            base = held.base if isinstance(held, AdapterLayer) else held
            layers = {n: a.layers[path] for n, a in registry.items() if path in a.layers}
            for layer in layers.values():
                _follow(model, layer, reference)
            placed[path] = held
            surgery.replace_module(model, path, RowDispatch(base, layers, names))
        encoder = model.get_encoder() if hasattr(model, "get_encoder") else None
        if encoder is not None:  # before generate repeats each row for its beams: one name a row
            hooks.append(encoder.register_forward_pre_hook(_one_name_per_row(len(names)), with_kwargs=True))
        model.peftcore_rows = names
        yield model
    finally:
        for hook in hooks:
            hook.remove()
        model.__dict__.pop("peftcore_rows", None)
        for path, held in placed.items():
            surgery.replace_module(model, path, held)


def _one_name_per_row(count: int):
    def check(module: nn.Module, args: tuple, kwargs: dict) -> None:
        inputs = kwargs.get("input_ids", kwargs.get("inputs_embeds", args[0] if args else None))
        if inputs is not None and inputs.shape[0] != count:
            raise ValueError(
                f"a batch of {inputs.shape[0]} rows, {count} adapter names: give one name per row"
            )

    return check


def refuse_in_rows(model: nn.Module, what: str) -> None:
    if "peftcore_rows" in model.__dict__:
        raise ValueError(f"{what} inside adapter_rows(model, ...): leave the block first")


def _follow(model: nn.Module, layer: AdapterLayer, reference: torch.Tensor | None) -> None:
    """An inactive adapter's layer is not the model's submodule, so ``model.eval()``, ``.to(device)``
    and ``.to(dtype)`` did not reach it: it takes the model's mode and the active adapter's device
    and dtype (its base, shared, has them already)."""
    layer.train(model.training)
    if reference is not None:
        for param in layer.adapter_params().values():
            param.data = param.data.to(device=reference.device, dtype=reference.dtype)


# --- swapping -----------------------------------------------------------------------------------


def _take_out(model: nn.Module, adapter: Adapter) -> None:
    """Put each of the adapter's bases back where its layer stood."""
    for path, layer in adapter.layers.items():
        surgery.replace_module(model, path, layer.base)
    model.__dict__.pop("peftcore_config", None)


def _put_in(model: nn.Module, adapter: Adapter, name: str) -> None:
    for path, layer in adapter.layers.items():
        held = model.get_submodule(path)
        if held is not layer.base:
            raise RuntimeError(
                f"{path!r} holds another module than adapter {name!r}'s base: the model was changed"
            )
        surgery.replace_module(model, path, layer)
    model.peftcore_config = adapter.config
    model.peftcore_active = name


def _freeze(adapter: Adapter) -> None:
    for layer in adapter.layers.values():
        for param in layer.adapter_params().values():
            param.requires_grad_(False)

"""The method contract: the base classes a PEFT method subclasses (the registry is methods.py).

A method is a **layer** method (it wraps each target linear layer: LoRA, DoRA, IA3) or an
**input** method (one module for the whole model: the soft prompt). A method class declares its
config and layer as class attributes and overrides only what differs from the defaults here;
surgery, checkpoint, stats and the CLI work through these classes and never name a method.

Every layer (``Method.layer``) has ``disabled``, ``initialise()`` and ``adapter_params()``; a layer
method's layer is an ``AdapterLayer`` and also has ``base``, ``merged``, ``merge()``, ``unmerge()``
and ``fold_into_base()``.
"""

from __future__ import annotations

import inspect
from abc import ABC, ABCMeta, abstractmethod
from typing import ClassVar, NoReturn

import torch
from torch import nn

from peftcore import weights


class AdapterLayer(nn.Module, metaclass=ABCMeta):
    """Wraps one linear layer ``base`` (frozen) with a trainable adapter.

    It stands where the linear layer stood, so it answers what model code reads from that module:
    ``in_features``, ``out_features`` (through peftcore.weights: a Conv1D has ``nx`` and ``nf``)
    and ``weight`` (T5's feed-forward casts to ``wo.weight.dtype``), the base's as it stores it.
    A subclass adds its tensors, ``forward``, ``adapter_params``, ``initialise``, ``merge`` and
    ``unmerge``, reading and writing the base weight only through peftcore.weights.
    """

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base
        self.merged = False
        self.disabled = False
        for param in base.parameters():
            param.requires_grad_(False)

    @property
    def in_features(self) -> int:
        return weights.in_features(self.base)

    @property
    def out_features(self) -> int:
        return weights.out_features(self.base)

    @property
    def weight(self) -> torch.Tensor:
        """The base's weight as the base stores it (a Conv1D's is (in, out)): model code reads it
        (T5's feed-forward casts to ``wo.weight.dtype``). Adapters read it through peftcore.weights."""
        return self.base.weight

    @abstractmethod
    def adapter_params(self) -> dict[str, nn.Parameter]:
        """The trainable tensors, by their names in this module."""
        ...

    @abstractmethod
    def initialise(self) -> None:
        """Run the init (after ``load_adapter`` has checked a file: PiSSA rewrites the base)."""
        ...

    @abstractmethod
    def merge(self) -> None: ...

    @abstractmethod
    def unmerge(self) -> None: ...

    def fold_into_base(self) -> None:
        """Merge for good (unload; no unmerge follows): the same as merge unless a method says otherwise."""
        self.merge()

    def forward_rows(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """This layer's output for some rows of a mixed batch (peftcore.adapters.adapter_rows),
        given the base's output for them: by default the layer run on them again."""
        return self(x)


class Method(ABC):
    """What every method declares. Subclass LayerMethod or InputMethod, not this."""

    config: ClassVar[type]  # a frozen dataclass that validates itself
    layer: ClassVar[type]  # the module that computes (an AdapterLayer for a layer method)
    identity_at_init: ClassVar[bool] = True  # a freshly injected model computes what the base computes
    # Whether training may recompute activations (gradient checkpointing) with the method on.
    supports_gradient_checkpointing: ClassVar[bool] = True
    # Names (in ``layer``) of the parameters LoRA+ trains at ratio x lr, besides every 1-D one.
    loraplus_fast: ClassVar[tuple[str, ...]] = ()

    @property
    def name(self) -> str:
        return type(self).__name__

    def differs(self, layer: nn.Module, name: str, config: object) -> str | None:
        """Why ``layer`` (at module ``name``) computes otherwise than ``config`` says, or None.
        Asked when an adapter is loaded into a model that already holds one."""
        return None

    def __repr__(self) -> str:
        return f"{self.name}()"


class LayerMethod(Method):
    """A method that wraps each target linear layer in ``layer`` (an AdapterLayer)."""

    def check(self, config: object, targets: dict[str, nn.Module]) -> None:
        """Refuse (or warn about) ``config`` on these targets (by name), before any module is swapped."""

    @abstractmethod
    def wrap(self, base: nn.Module, config: object, name: str, initialise: bool = True) -> AdapterLayer:
        """The layer standing in for ``base`` (module ``name``); ``initialise=False`` skips the init."""
        ...


class InputMethod(Method):
    """A method that adds one module for the whole model (a soft prompt, a prefix)."""

    identity_at_init = False
    # Why it cannot be merged into the weights (merge and unload(merge=True) refuse with it).
    not_a_weight: ClassVar[str] = "an input transform is not a weight"

    @abstractmethod
    def install(self, model: nn.Module, config: object, initialise: bool = True) -> nn.Module:
        """Add the module to ``model`` and return it; only its parameters train."""
        ...

    # The model attribute ``install`` puts the module on; its forward hooks go in ``module.handles``.
    attribute: ClassVar[str]

    def remove(self, model: nn.Module, module: nn.Module) -> None:
        """Take out what ``install`` added: the module's hooks, then the module."""
        for handle in module.handles:
            handle.remove()
        delattr(model, self.attribute)

    def refuse_merge(self) -> NoReturn:
        raise ValueError(f"{self.not_a_weight}: it cannot be merged; unload(model, merge=False) removes it")


def bound_arguments(module: nn.Module, args: tuple, kwargs: dict) -> dict:
    """The arguments a forward pre-hook (``with_kwargs=True``) of ``module`` sees, positional ones
    by name, so an input method's hook reads them in one place."""
    if not args:
        return dict(kwargs)
    return dict(inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments)

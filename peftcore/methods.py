"""The one list of PEFT methods. A method is a class (the bases are in contract.py); adding one is
writing its module and one line in METHODS (docs/adding-a-method.md walks through DoRA). Surgery,
checkpoint, stats, the CLI and the tests iterate this list; none of them names a method.
"""

from __future__ import annotations

from torch import nn

from peftcore.contract import InputMethod, LayerMethod, Method
from peftcore.dora import DoRA
from peftcore.ia3 import IA3
from peftcore.lora import LoRA
from peftcore.prefix import PrefixTuning
from peftcore.prompt import PromptTuning

METHODS: tuple[Method, ...] = (
    LoRA(),
    DoRA(),
    IA3(),
    PromptTuning(),
    PrefixTuning(),
)

__all__ = [
    "METHODS",
    "InputMethod",
    "LayerMethod",
    "Method",
    "config_classes",
    "for_config",
    "for_layer",
    "layer_types",
]


def config_classes() -> tuple[type, ...]:
    return tuple(method.config for method in METHODS)


def layer_types() -> tuple[type, ...]:
    return tuple(method.layer for method in METHODS)


def for_config(config: object) -> Method:
    """The method of ``config`` (by its exact class: DoRAConfig is a LoRAConfig too)."""
    if type(config) in config_classes():
        return for_config_class(type(config))
    names = ", ".join(cls.__name__ for cls in config_classes())
    raise TypeError(f"expected a method config ({names}), got {type(config).__name__}")


def for_config_class(cls: type) -> Method:
    return next(method for method in METHODS if cls is method.config)


def for_layer(layer: nn.Module) -> Method:
    return next(method for method in METHODS if type(layer) is method.layer)

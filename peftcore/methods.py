"""The one list of PEFT methods. A method is a module; adding one is writing that module and
adding its name to METHOD_MODULES (docs/adding-a-method.md walks through DoRA). Nothing else in peftcore or
experiments names a method: surgery, checkpoint, stats, the CLI and the tests iterate this list.

What a method module provides (``lora.py`` is the model):

    __all__                 its public names (peftcore re-exports them)
    Config                  its config: a frozen dataclass that validates itself
    Layer                   its module: a wrapper of one linear layer, or an input transform
    KIND                    "layer" (Layer wraps each target: ``base``, ``merge``, ``unmerge``,
                            ``fold_into_base``, ``merged``) or "input" (one Layer for the model)
                            Every Layer has ``disabled``, ``initialise()`` and ``adapter_params()``.
    IDENTITY_AT_INIT        whether a freshly injected model computes what the base computes
    PEFT_TYPE, PEFT_NAMES   peft's peft_type for it, and peft's names of its fields that differ
    PEFT_IMPLEMENTED, PEFT_AT_DEFAULT, PEFT_INERT
                            every field of peft's config, accounted for (peft_format.fields.check_fields)
    claims(data)            is this adapter_config.json the method's? (DoRA: LORA + use_dora)
    config_from_peft(data, model) -> Config;  config_to_peft(config, model) -> dict
    peft_tensors(layer)     the layer's live tensors under peft's names (for loading);
    saved_tensors(layer)    and what the file holds (usually the same)
    differs(layer, name, config)   why the layer computes otherwise than ``config`` says, or None
    "layer" methods:        wrap(base, config, name, initialise) -> Layer;  check(config, targets)
    "input" methods:        install(model, config, initialise) -> Layer;  remove(model, layer);
                            read_file_tensors(saved, data) (the file's tensors as the layer has them)
"""

from __future__ import annotations

import importlib
from types import ModuleType

from torch import nn

# One line per method: the module that holds it (any importable module, in peftcore or not).
METHOD_MODULES = (
    "peftcore.lora",
    "peftcore.dora",
    "peftcore.ia3",
    "peftcore.prompt",
)
METHODS: tuple[ModuleType, ...] = tuple(importlib.import_module(name) for name in METHOD_MODULES)


def config_classes() -> tuple[type, ...]:
    return tuple(method.Config for method in METHODS)


def layer_types() -> tuple[type, ...]:
    return tuple(method.Layer for method in METHODS)


def for_config(config: object) -> ModuleType:
    """The method of ``config`` (by its exact class: DoRAConfig is a LoRAConfig too)."""
    if type(config) in config_classes():
        return for_config_class(type(config))
    names = ", ".join(cls.__name__ for cls in config_classes())
    raise TypeError(f"expected a method config ({names}), got {type(config).__name__}")


def for_config_class(cls: type) -> ModuleType:
    return next(method for method in METHODS if cls is method.Config)


def for_layer(layer: nn.Module) -> ModuleType:
    return next(method for method in METHODS if type(layer) is method.Layer)


def for_peft(data: dict) -> ModuleType:
    """The method that claims a peft ``adapter_config.json``."""
    for method in METHODS:
        if method.claims(data):
            return method
    kinds = sorted({method.PEFT_TYPE for method in METHODS})
    raise ValueError(f"adapter peft_type {data.get('peft_type')!r} is not supported; peftcore loads {kinds}")

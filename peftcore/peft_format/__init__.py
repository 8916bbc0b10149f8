"""peft's adapter files, translated: ``adapter_config.json`` fields and tensor names, per method.

One translator per method (a ``Format``: base.py), keyed by the method's class in FORMATS; the
fields every method shares and the tensor names' prefix are here. Only peftcore.checkpoint calls
this package (and the CLI reads ``peft_names`` for its hints); the method modules know nothing of it.

    adapter_config.json          peft_type, task_type, ..., the method's fields (its translator's tables
                                 account for every field of peft's config class: fields.py)
    adapter_model.safetensors    base_model.model.<module>.<tensor> for a layer method's layers and
                                 for modules_to_save; an input method's tensors by their own name
"""

from __future__ import annotations

import torch
from torch import nn

from peftcore import families, methods
from peftcore.contract import AdapterLayer
from peftcore.dora import DoRA
from peftcore.ia3 import IA3
from peftcore.lora import LoRA
from peftcore.matching import shown
from peftcore.peft_format.base import Format
from peftcore.peft_format.dora import DoRAFormat
from peftcore.peft_format.fields import PEFT_FORMAT_VERSION
from peftcore.peft_format.ia3 import IA3Format
from peftcore.peft_format.lora import LoRAFormat
from peftcore.peft_format.prefix import PrefixTuningFormat
from peftcore.peft_format.prompt import PromptTuningFormat
from peftcore.prefix import PrefixTuning
from peftcore.prompt import PromptTuning
from peftcore.surgery import adapter_layers, trained_copies

# One line per method that peft has: the method's class and its translator.
FORMATS: dict[type[methods.Method], Format] = {
    LoRA: LoRAFormat(),
    DoRA: DoRAFormat(),
    IA3: IA3Format(),
    PromptTuning: PromptTuningFormat(),
    PrefixTuning: PrefixTuningFormat(),
}
PREFIX = "base_model.model."  # peft's name for the model inside its PeftModel

__all__ = [
    "FORMATS",
    "holds",
    "Format",
    "PREFIX",
    "adapter_tensors",
    "config_from_peft",
    "config_to_peft",
    "for_config",
    "for_file",
    "peft_names",
]


def holds(config: object) -> bool:
    """Whether peft's files can hold the method of ``config`` (it has a translator here)."""
    return type(methods.for_config(config)) in FORMATS


def for_config(config: object) -> Format:
    method = methods.for_config(config)
    if type(method) not in FORMATS:
        raise ValueError(
            f"{method.name} has no translator in peftcore.peft_format: peft's files cannot hold it"
        )
    return FORMATS[type(method)]


def for_file(data: dict) -> Format:
    """The translator that claims a peft ``adapter_config.json``."""
    for translator in FORMATS.values():
        if translator.claims(data):
            return translator
    kinds = sorted({translator.peft_type for translator in FORMATS.values()})
    raise ValueError(f"adapter peft_type {data.get('peft_type')!r} is not supported; peftcore loads {kinds}")


def peft_names(config_class: type) -> dict[str, str]:
    """peft's names of ``config_class``'s fields where they differ: {peft's name: peftcore's}."""
    method = methods.for_config_class(config_class)
    return dict(FORMATS[type(method)].names) if type(method) in FORMATS else {}


def config_from_peft(data: dict, model: nn.Module) -> object:
    """The config that computes on ``model`` what peft computes with ``data``, or a ValueError naming why not."""
    return for_file(data).config_from_peft(data, model)


def config_to_peft(config: object, model: nn.Module) -> dict:
    """adapter_config.json for ``config``: the fields every method writes the same way (and the
    targeting fields, for the methods that have them), then the method's own."""
    fields = {
        "task_type": families.task_type(model),
        "peft_version": PEFT_FORMAT_VERSION,
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
        "revision": None,
        "inference_mode": True,
    }
    if isinstance(methods.for_config(config), methods.LayerMethod):
        fields.update(
            target_modules=shown(config.target_modules),
            exclude_modules=shown(config.exclude_modules),
            modules_to_save=list(config.modules_to_save) or None,
        )
    return {**fields, **for_config(config).config_to_peft(config, model)}


def adapter_tensors(model: nn.Module, config: object, saving: bool = False) -> dict[str, torch.Tensor]:
    """The adapter's tensors under peft's names: live ones (to load into), or as saved. A layer's
    names follow its module's dotted name; an input transform's stand alone (prompt_embeddings)."""
    translator = for_config(config)
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in adapter_layers(model):
        prefix = f"{PREFIX}{name}." if isinstance(layer, AdapterLayer) else ""
        for key, tensor in (translator.saved_tensors if saving else translator.peft_tensors)(layer).items():
            tensors[prefix + key] = tensor
    for name, copy in trained_copies(model):
        for key, tensor in copy.trained_state().items():
            tensors[f"{PREFIX}{name}.{key}"] = tensor
    return tensors

"""peftcore: parameter-efficient fine-tuning layers written from scratch, peft-compatible on disk.

Each method's public names (its config and its layer) come from its module's ``__all__``, for
every method in peftcore.methods.METHODS.
"""

from peftcore import methods
from peftcore.checkpoint import load_adapter, save_adapter
from peftcore.config import NF4Config
from peftcore.nf4 import NF4Linear
from peftcore.paged import PagedAdamW
from peftcore.stats import ParamCount, count_parameters, memory_footprint, print_trainable_parameters
from peftcore.surgery import disable_adapters, inject, merge, quantize, unload, unmerge

for _method in methods.METHODS:
    globals().update({name: getattr(_method, name) for name in _method.__all__})

__all__ = [
    "NF4Config",
    "NF4Linear",
    "PagedAdamW",
    "ParamCount",
    "count_parameters",
    "disable_adapters",
    "inject",
    "load_adapter",
    "memory_footprint",
    "merge",
    "print_trainable_parameters",
    "quantize",
    "save_adapter",
    "unload",
    "unmerge",
    *(name for _method in methods.METHODS for name in _method.__all__),
]

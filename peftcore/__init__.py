"""peftcore: parameter-efficient fine-tuning layers written from scratch, peft-compatible on disk."""

from peftcore.adapters import active_adapter, adapter_names, adapter_rows, delete_adapter, set_adapter
from peftcore.checkpoint import load_adapter, save_adapter
from peftcore.config import NF4Config
from peftcore.dora import DoRAConfig, DoRALinear
from peftcore.ia3 import IA3Config, IA3Scaler
from peftcore.lora import LoRAConfig, LoRALinear
from peftcore.nf4 import NF4Linear
from peftcore.paged import PagedAdamW
from peftcore.prefix import PrefixEncoder, PrefixTuningConfig
from peftcore.prompt import PromptTuningConfig, SoftPrompt
from peftcore.stats import ParamCount, count_parameters, memory_footprint, print_trainable_parameters
from peftcore.surgery import disable_adapters, inject, merge, quantize, unload, unmerge

__all__ = [
    "DoRAConfig",
    "DoRALinear",
    "IA3Config",
    "IA3Scaler",
    "LoRAConfig",
    "LoRALinear",
    "NF4Config",
    "NF4Linear",
    "PagedAdamW",
    "PrefixEncoder",
    "PrefixTuningConfig",
    "ParamCount",
    "PromptTuningConfig",
    "SoftPrompt",
    "active_adapter",
    "adapter_names",
    "adapter_rows",
    "count_parameters",
    "delete_adapter",
    "disable_adapters",
    "inject",
    "load_adapter",
    "memory_footprint",
    "merge",
    "print_trainable_parameters",
    "quantize",
    "save_adapter",
    "set_adapter",
    "unload",
    "unmerge",
]

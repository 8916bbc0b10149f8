"""DoRA in peft's files: a LoRA file with ``use_dora: true`` and ``<module>.lora_magnitude_vector``."""

from __future__ import annotations

import torch
from torch import nn

from peftcore.dora import DoRAConfig, DoRALinear
from peftcore.peft_format.lora import LoRAFormat

MAGNITUDE = "lora_magnitude_vector"


class DoRAFormat(LoRAFormat):
    label = "DoRA"
    implemented = (*LoRAFormat.implemented, "use_dora")
    at_default = {k: v for k, v in LoRAFormat.at_default.items() if k != "use_dora"}
    config_class = DoRAConfig

    def claims(self, data: dict) -> bool:
        return data.get("peft_type") == self.peft_type and bool(data.get("use_dora"))

    def config_to_peft(self, config: DoRAConfig, model: nn.Module) -> dict:
        return {**super().config_to_peft(config, model), "use_dora": True}

    def peft_tensors(self, layer: DoRALinear) -> dict[str, torch.Tensor]:
        """LoRA's A and B, and the magnitude under peft's name."""
        tensors = super().peft_tensors(layer)  # the layer's adapter_params
        tensors[MAGNITUDE] = tensors.pop("magnitude")
        return tensors

    def saved_tensors(self, layer: DoRALinear) -> dict[str, torch.Tensor]:
        """LoRA's (a pissa_niter layer's converted to rank 2r; the magnitude applies to the same
        direction W + s B A either way) and the magnitude."""
        return {**super().saved_tensors(layer), MAGNITUDE: layer.magnitude}

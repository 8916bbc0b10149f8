"""(IA)^3 in peft's files: IA3Config's fields (unchanged from release 0.17 to 0.21) and ``ia3_l``."""

from __future__ import annotations

import torch
from torch import nn

from peftcore.ia3 import IA3Config, IA3Scaler
from peftcore.matching import shown
from peftcore.peft_format.base import Format
from peftcore.peft_format.fields import (
    check_fan_in_fan_out,
    default_targets,
    fan_in_fan_out_to_peft,
    modules_to_save_of,
)


class IA3Format(Format):
    peft_type = "IA3"
    label = "IA3"
    implemented = (
        "target_modules",
        "exclude_modules",
        "feedforward_modules",
        "modules_to_save",
        "fan_in_fan_out",  # true for Conv1D targets, false for nn.Linear: peft sets it by the target, so does peftcore
    )
    inert = {"init_ia3_weights": "decides only where training starts; the file's vectors replace them"}

    def config_from_peft(self, data: dict, model: nn.Module) -> IA3Config:
        self.check_fields(data)
        targets = data.get("target_modules") or default_targets(model, "ia3_targets", "IA3")
        feedforward = data.get("feedforward_modules")
        if feedforward is None:  # peft's default for the family
            feedforward = default_targets(model, "ia3_feedforward", "IA3")
        config = IA3Config(
            target_modules=targets if isinstance(targets, str) else tuple(targets),
            feedforward_modules=feedforward if isinstance(feedforward, str) else tuple(feedforward),
            modules_to_save=modules_to_save_of(data, model),
            exclude_modules=data.get("exclude_modules"),
        )
        check_fan_in_fan_out(data, model, config)
        return config

    def config_to_peft(self, config: IA3Config, model: nn.Module) -> dict:
        return {
            "peft_type": self.peft_type,
            "feedforward_modules": shown(config.feedforward_modules),
            "init_ia3_weights": True,
            "fan_in_fan_out": fan_in_fan_out_to_peft(model, config),
        }

    def peft_tensors(self, layer: IA3Scaler) -> dict[str, torch.Tensor]:
        """peft's ``ia3_l``: (1, in_features) for a feed-forward target, else (out_features, 1)."""
        return {"ia3_l": layer.scale.view((1, -1) if layer.feedforward else (-1, 1))}

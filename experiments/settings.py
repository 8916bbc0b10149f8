"""The fine-tuning module's option groups: the optimizer with its schedule, and generation.

Each is a frozen dataclass, so jsonargparse shows it as a group (``--model.optimizer.lr``,
``--model.generation.num_beams``) and a config writes it as one section::

    model:
      optimizer: {name: adamw, lr: 1.0e-3, warmup_ratio: 0.06}
      generation: {num_beams: 4, max_new_tokens: 128}

A value torch or ``generate`` would take with a confusing error (``num_beams: 0`` divides by
zero) or without one (a negative weight decay) is refused when the group is made, by its
option's name.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

OPTIMIZERS = ("adamw", "paged_adamw")


def _refuse(name: str, value: object, allowed: str) -> NoReturn:
    raise ValueError(f"model.{name} must be {allowed}, got {value!r}")


@dataclass(frozen=True)
class OptimizerSettings:
    """AdamW and its learning-rate schedule (linear warm-up, then linear decay to 0).

    Args:
        name: ``adamw`` (torch's, fused where Lightning allows) or ``paged_adamw``
            (peftcore.PagedAdamW: optimizer state paged between the GPU and pinned host memory).
        lr: peak learning rate.
        weight_decay: decoupled weight decay, applied to matrices only (not to biases, norms,
            or IA3 vectors, which decay toward a meaningless zero).
        betas: AdamW betas.
        warmup_ratio: fraction of the training steps with linear warm-up.
        loraplus_lr_ratio: LoRA+ (Hayou et al., 2024): the B factors and the 1-D adapter
            parameters train at ``lr * loraplus_lr_ratio`` (as peft's create_loraplus_optimizer);
            None (the default) is plain training. peft requires the ratio; so does this: no
            default ratio is assumed (the paper uses about 16).
        gpu_budget_bytes: PagedAdamW's device budget for optimizer state (None: all on device).
    """

    name: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_ratio: float = 0.0
    loraplus_lr_ratio: float | None = None
    gpu_budget_bytes: int | None = None

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            _refuse("optimizer.name", self.name, f"one of {OPTIMIZERS}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            _refuse("optimizer.lr", self.lr, "a positive number (the peak learning rate, e.g. 1e-3)")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            _refuse("optimizer.weight_decay", self.weight_decay, "a number >= 0 (0 turns weight decay off)")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            _refuse("optimizer.betas", list(self.betas), "two numbers in [0, 1), e.g. [0.9, 0.999]")
        if not 0.0 <= self.warmup_ratio < 1.0:
            _refuse("optimizer.warmup_ratio", self.warmup_ratio, "in [0, 1)")
        if self.loraplus_lr_ratio is not None and not self.loraplus_lr_ratio > 0:
            _refuse(
                "optimizer.loraplus_lr_ratio",
                self.loraplus_lr_ratio,
                "a positive number (about 16 in the paper), or null",
            )
        if self.gpu_budget_bytes is not None and self.gpu_budget_bytes < 0:
            _refuse(
                "optimizer.gpu_budget_bytes",
                self.gpu_budget_bytes,
                "a number of bytes >= 0, or null (all optimizer state on the device)",
            )


@dataclass(frozen=True)
class GenerationSettings:
    """How summaries are generated in validation, test and predict.

    Args:
        num_beams: beams (1 is greedy decoding).
        max_new_tokens: longest generated summary, in tokens.
    """

    num_beams: int = 1
    max_new_tokens: int = 64

    def __post_init__(self) -> None:
        if self.num_beams < 1:
            _refuse("generation.num_beams", self.num_beams, "an integer >= 1 (1 is greedy decoding)")
        if self.max_new_tokens < 1:
            _refuse(
                "generation.max_new_tokens",
                self.max_new_tokens,
                "an integer >= 1 (the longest generated summary, in tokens)",
            )


Settings = TypeVar("Settings", OptimizerSettings, GenerationSettings)


def settings_of(group: type[Settings], value: Any, name: str) -> Settings:
    """``value`` as the group's dataclass: as given, or made (and so checked) from a mapping of its
    fields (a config section, or the plain dict LightningCLI hands the hyperparameters)."""
    if isinstance(value, group):
        return value
    if isinstance(value, Mapping) or hasattr(value, "as_dict"):
        fields = dict(value.as_dict() if hasattr(value, "as_dict") else value)
        try:
            return group(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
        except TypeError as err:
            raise ValueError(f"model.{name}: {err}") from None
    raise ValueError(f"model.{name} must be {group.__name__} (or a mapping of its fields), got {value!r}")

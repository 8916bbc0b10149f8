"""Configs validate themselves on construction; the checks they share live here, with NF4Config.

A bad value raises ``ValueError`` naming the field, the value given and what is allowed, so a
typo in a YAML file fails before any model is touched. Each method's config is in its own module
(``lora.py``, ``ia3.py``, ...).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NoReturn

import torch

from peftcore.matching import TargetModules


def fail(cls: str, name: str, value: object, allowed: str) -> NoReturn:
    raise ValueError(f"{cls}.{name} must be {allowed}, got {value!r}")


def normalise_targets(cls: str, name: str, value: object, allow_empty: bool = False) -> TargetModules:
    """Lists become tuples (YAML gives lists); a string is kept as a regex and must compile."""
    if isinstance(value, str):
        try:
            re.compile(value)
        except re.error as err:
            fail(cls, name, value, f"a valid regular expression ({err})")
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) and v for v in value):
        if not value and not allow_empty:
            fail(cls, name, value, "a non-empty list of module names or one regex string")
        return tuple(value)
    fail(cls, name, value, "a list of module names or one regex string")
    raise AssertionError  # unreachable


def positive_int(cls: str, name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        fail(cls, name, value, "a positive integer")


def positive_number(cls: str, name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        fail(cls, name, value, "a positive number")


def optional_targets(cls: str, name: str, value: object) -> TargetModules | None:
    """exclude_modules: None, a list of names or one regex; an empty list means None."""
    if value is None or (isinstance(value, (list, tuple)) and not value):
        return None
    return normalise_targets(cls, name, value)


def check_pattern(cls: str, name: str, value: object, check_value) -> dict:
    """rank_pattern / alpha_pattern: {regex for a dotted tail of the module name: value}."""
    if not isinstance(value, dict):
        fail(cls, name, value, "a mapping of module-name patterns to values")
    for key, item in value.items():
        try:
            re.compile(key) if isinstance(key, str) else fail(cls, name, value, "a mapping with string keys")
        except re.error as err:
            fail(cls, name, value, f"a mapping whose keys are valid regular expressions ({key!r}: {err})")
        check_value(cls, f"{name}[{key!r}]", item)
    return dict(value)


def layer_indices(cls: str, value: object) -> tuple[int, ...] | None:
    """layers_to_transform: one index or a list of them; an empty list means every layer (None)."""
    if value is None:
        return None
    indices = (value,) if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(indices, (list, tuple)) or not all(
        isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in indices
    ):
        fail(cls, "layers_to_transform", value, "a layer index or a list of non-negative layer indices")
    return tuple(indices) or None


def normalise_common(config) -> None:
    """The targeting fields every layer method has: target_modules, exclude_modules, modules_to_save."""
    name = type(config).__name__
    object.__setattr__(
        config, "target_modules", normalise_targets(name, "target_modules", config.target_modules)
    )
    object.__setattr__(
        config, "exclude_modules", optional_targets(name, "exclude_modules", config.exclude_modules)
    )
    if isinstance(config.modules_to_save, str):
        fail(name, "modules_to_save", config.modules_to_save, "a list of module names")
    object.__setattr__(
        config,
        "modules_to_save",
        normalise_targets(name, "modules_to_save", config.modules_to_save or (), allow_empty=True),
    )


def is_nf4_blocksize(value: object) -> bool:
    """The one rule for an NF4 blocksize: a power of two in [32, 4096]."""
    return (
        isinstance(value, int)
        and not isinstance(value, bool)
        and 32 <= value <= 4096
        and not value & (value - 1)
    )


@dataclass(frozen=True)
class NF4Config:
    """4-bit NormalFloat quantization of the frozen base (Dettmers et al., 2023, QLoRA).

    Args:
        blocksize: elements per absmax block, a power of two in [32, 4096].
        double_quant: also quantize the absmax vector (8-bit blocks of 256 around its mean).
        compute_dtype: dtype the weight is dequantized to for the matmul.
        skip_modules: module names kept in full precision; None means the model's own
            keep-in-fp32 list (T5: ``wo``) plus ``lm_head``.
    """

    blocksize: int = 64
    double_quant: bool = True
    compute_dtype: torch.dtype = torch.bfloat16
    skip_modules: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        name = type(self).__name__
        if not is_nf4_blocksize(self.blocksize):
            fail(
                name,
                "blocksize",
                self.blocksize,
                "a power of two in [32, 4096] (64 is bitsandbytes' default)",
            )
        if isinstance(self.compute_dtype, str):  # from YAML: "bfloat16", "torch.float16", ...
            object.__setattr__(self, "compute_dtype", _parse_dtype(name, self.compute_dtype))
        if self.compute_dtype not in (torch.float32, torch.bfloat16, torch.float16):
            fail(name, "compute_dtype", self.compute_dtype, "torch.float32, torch.bfloat16 or torch.float16")
        if self.skip_modules is not None:
            object.__setattr__(
                self,
                "skip_modules",
                normalise_targets(name, "skip_modules", self.skip_modules, allow_empty=True),
            )


def _parse_dtype(cls: str, text: str) -> torch.dtype:
    dtype = getattr(torch, text.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        fail(cls, "compute_dtype", text, "'float32', 'bfloat16' or 'float16'")
    return dtype

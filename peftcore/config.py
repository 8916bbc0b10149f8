"""Method configurations: frozen dataclasses that validate themselves on construction.

A bad value raises ``ValueError`` naming the field, the value given and what is allowed, so a
typo in a YAML file fails before any model is touched.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Optional, Union

import torch

# A tuple of names matched against the end of a module's dotted name, or one regex string
# matched against the whole dotted name (peft's two conventions).
TargetModules = Union[tuple[str, ...], str]

LORA_INITS = ("kaiming", "gaussian", "pissa", "pissa_niter_<N>", "olora")
PROMPT_INITS = ("random", "vocab", "text")


def _fail(cls: str, name: str, value: object, allowed: str) -> None:
    raise ValueError(f"{cls}.{name} must be {allowed}, got {value!r}")


def _normalise_targets(cls: str, name: str, value: object, allow_empty: bool = False) -> TargetModules:
    """Lists become tuples (YAML gives lists); a string is kept as a regex and must compile."""
    if isinstance(value, str):
        try:
            re.compile(value)
        except re.error as err:
            _fail(cls, name, value, f"a valid regular expression ({err})")
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) and v for v in value):
        if not value and not allow_empty:
            _fail(cls, name, value, "a non-empty list of module names or one regex string")
        return tuple(value)
    _fail(cls, name, value, "a list of module names or one regex string")
    raise AssertionError  # unreachable


def _positive_int(cls: str, name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        _fail(cls, name, value, "a positive integer")


@dataclass(frozen=True)
class LoRAConfig:
    """Low-rank adaptation (Hu et al., 2021): ``y = W x + (alpha / r) * B A x``.

    Args:
        r: rank of the update ``B @ A``.
        alpha: scaling numerator; the update is scaled by ``alpha / r`` (``alpha / sqrt(r)``
            with ``use_rslora``).
        dropout: dropout probability applied to the adapter's input, in [0, 1).
        target_modules: module names matched against the end of each dotted name
            (``("q", "v")``), or one regex string matched against the whole name.
        init: ``kaiming`` | ``gaussian`` | ``pissa`` | ``pissa_niter_<N>`` | ``olora``.
        use_rslora: rank-stabilised scaling ``alpha / sqrt(r)`` (Kalajdzievski, 2023).
        modules_to_save: modules trained in full next to the adapter (e.g. ``lm_head``).
    """

    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    target_modules: TargetModules = ("q", "v")
    init: str = "kaiming"
    use_rslora: bool = False
    modules_to_save: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        name = type(self).__name__
        _positive_int(name, "r", self.r)
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            _fail(name, "alpha", self.alpha, "a positive number")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            _fail(name, "dropout", self.dropout, "a number in [0, 1)")
        if not _is_lora_init(self.init):
            _fail(name, "init", self.init, "one of " + " | ".join(LORA_INITS))
        object.__setattr__(self, "target_modules", _normalise_targets(name, "target_modules", self.target_modules))
        object.__setattr__(
            self, "modules_to_save", _normalise_targets(name, "modules_to_save", self.modules_to_save, allow_empty=True)
        )
        if isinstance(self.modules_to_save, str):
            _fail(name, "modules_to_save", self.modules_to_save, "a list of module names")

    @property
    def scale(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r


def _is_lora_init(init: object) -> bool:
    if init in ("kaiming", "gaussian", "pissa", "olora"):
        return True
    match = re.fullmatch(r"pissa_niter_(\d+)", init) if isinstance(init, str) else None
    return match is not None and int(match.group(1)) >= 0


@dataclass(frozen=True)
class IA3Config:
    """(IA)^3 (Liu et al., 2022): learned vectors that rescale activations.

    Feed-forward targets scale their input, ``y = W (l * x)``; every other target scales its
    output, ``y = l * (W x)``. Each ``l`` starts at ones, so the model starts unchanged.

    Args:
        target_modules: module names (matched against the end of the dotted name) or one regex.
        feedforward_modules: the subset of targets whose input is scaled; must be targets too.
        modules_to_save: modules trained in full next to the adapter.
    """

    target_modules: TargetModules = ("k", "v", "wo")
    feedforward_modules: TargetModules = ("wo",)
    modules_to_save: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        name = type(self).__name__
        object.__setattr__(self, "target_modules", _normalise_targets(name, "target_modules", self.target_modules))
        object.__setattr__(
            self,
            "feedforward_modules",
            _normalise_targets(name, "feedforward_modules", self.feedforward_modules, allow_empty=True),
        )
        object.__setattr__(
            self, "modules_to_save", _normalise_targets(name, "modules_to_save", self.modules_to_save, allow_empty=True)
        )
        if isinstance(self.modules_to_save, str):
            _fail(name, "modules_to_save", self.modules_to_save, "a list of module names")
        if isinstance(self.target_modules, tuple) and isinstance(self.feedforward_modules, tuple):
            stray = [m for m in self.feedforward_modules if m not in self.target_modules]
            if stray:
                _fail(
                    name,
                    "feedforward_modules",
                    self.feedforward_modules,
                    f"a subset of target_modules {list(self.target_modules)} ({stray} are not targets)",
                )


@dataclass(frozen=True)
class PromptTuningConfig:
    """Soft-prompt tuning (Lester et al., 2021): ``num_virtual_tokens`` learned embeddings
    prepended to the encoder input.

    Args:
        num_virtual_tokens: how many embeddings to learn.
        init: ``random`` | ``vocab`` (copies of random vocabulary embeddings) | ``text``
            (the embeddings of ``init_text``'s tokens, repeated to length).
        init_text: the text for ``init="text"``.
    """

    num_virtual_tokens: int = 20
    init: str = "random"
    init_text: Optional[str] = None

    def __post_init__(self) -> None:
        name = type(self).__name__
        _positive_int(name, "num_virtual_tokens", self.num_virtual_tokens)
        if self.init not in PROMPT_INITS:
            _fail(name, "init", self.init, "one of " + " | ".join(PROMPT_INITS))
        if (self.init == "text") != bool(self.init_text):
            _fail(name, "init_text", self.init_text, "a non-empty string exactly when init='text'")


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
    skip_modules: Optional[tuple[str, ...]] = None

    def __post_init__(self) -> None:
        name = type(self).__name__
        b = self.blocksize
        if isinstance(b, bool) or not isinstance(b, int) or not 32 <= b <= 4096 or b & (b - 1):
            _fail(name, "blocksize", b, "a power of two in [32, 4096] (64 is bitsandbytes' default)")
        if isinstance(self.compute_dtype, str):  # from YAML: "bfloat16", "torch.float16", ...
            object.__setattr__(self, "compute_dtype", _parse_dtype(name, self.compute_dtype))
        if self.compute_dtype not in (torch.float32, torch.bfloat16, torch.float16):
            _fail(name, "compute_dtype", self.compute_dtype, "torch.float32, torch.bfloat16 or torch.float16")
        if self.skip_modules is not None:
            object.__setattr__(
                self, "skip_modules", _normalise_targets(name, "skip_modules", self.skip_modules, allow_empty=True)
            )


def _parse_dtype(cls: str, text: str) -> torch.dtype:
    dtype = getattr(torch, text.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        _fail(cls, "compute_dtype", text, "'float32', 'bfloat16' or 'float16'")
    return dtype

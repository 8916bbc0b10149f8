"""Method configurations: frozen dataclasses that validate themselves on construction.

A bad value raises ``ValueError`` naming the field, the value given and what is allowed, so a
typo in a YAML file fails before any model is touched.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Optional

import torch

from peftcore.matching import TargetModules, pattern_key

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


def _positive_number(cls: str, name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        _fail(cls, name, value, "a positive number")


def _optional_targets(cls: str, name: str, value: object) -> Optional[TargetModules]:
    """exclude_modules: None, a list of names or one regex; an empty list means None."""
    if value is None or (isinstance(value, (list, tuple)) and not value):
        return None
    return _normalise_targets(cls, name, value)


def _pattern(cls: str, name: str, value: object, check_value) -> dict:
    """rank_pattern / alpha_pattern: {regex for a dotted tail of the module name: value}."""
    if not isinstance(value, dict):
        _fail(cls, name, value, "a mapping of module-name patterns to values")
    for key, item in value.items():
        try:
            re.compile(key) if isinstance(key, str) else _fail(cls, name, value, "a mapping with string keys")
        except re.error as err:
            _fail(cls, name, value, f"a mapping whose keys are valid regular expressions ({key!r}: {err})")
        check_value(cls, f"{name}[{key!r}]", item)
    return dict(value)


def _layers(cls: str, value: object) -> Optional[tuple[int, ...]]:
    """layers_to_transform: one index or a list of them; an empty list means every layer (None)."""
    if value is None:
        return None
    indices = (value,) if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(indices, (list, tuple)) or not all(
        isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in indices
    ):
        _fail(cls, "layers_to_transform", value, "a layer index or a list of non-negative layer indices")
    return tuple(indices) or None


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
        modules_to_save: modules trained in full next to the adapter (e.g. ``lm_head``): each
            gets its own trainable copy, as in peft; matched as a plain suffix of the name.
        exclude_modules: names (or one regex) of modules never to adapt, matched as target_modules.
        rank_pattern: ``{pattern: r}`` overriding ``r`` for the modules whose dotted name ends
            with a match of ``pattern`` (a regex); the first matching pattern wins.
        alpha_pattern: ``{pattern: alpha}``, the same for ``alpha``.
        layers_to_transform: adapt only the layers with these indices (the number after
            ``layers_pattern`` in the name, e.g. ``block`` in T5); needs a list ``target_modules``.
        layers_pattern: the name(s) of the layer list, e.g. ``block``; None takes the first
            numbered segment of the name.
    """

    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    target_modules: TargetModules = ("q", "v")
    init: str = "kaiming"
    use_rslora: bool = False
    modules_to_save: tuple[str, ...] = ()
    exclude_modules: Optional[TargetModules] = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    layers_to_transform: Optional[tuple[int, ...]] = None
    layers_pattern: Optional[tuple[str, ...]] = None

    def __post_init__(self) -> None:
        name = type(self).__name__
        _positive_int(name, "r", self.r)
        _positive_number(name, "alpha", self.alpha)
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            _fail(name, "dropout", self.dropout, "a number in [0, 1)")
        if not _is_lora_init(self.init):
            _fail(name, "init", self.init, "one of " + " | ".join(LORA_INITS))
        _normalise_common(self)
        object.__setattr__(self, "rank_pattern", _pattern(name, "rank_pattern", self.rank_pattern, _positive_int))
        object.__setattr__(self, "alpha_pattern", _pattern(name, "alpha_pattern", self.alpha_pattern, _positive_number))
        object.__setattr__(self, "layers_to_transform", _layers(name, self.layers_to_transform))
        if isinstance(self.layers_pattern, str):
            object.__setattr__(self, "layers_pattern", (self.layers_pattern,))
        if self.layers_pattern is not None:
            object.__setattr__(self, "layers_pattern", _normalise_targets(name, "layers_pattern", self.layers_pattern))
            if self.layers_to_transform is None:
                _fail(name, "layers_pattern", self.layers_pattern, "None unless layers_to_transform is set too")
        if self.layers_to_transform is not None and isinstance(self.target_modules, str):
            _fail(
                name, "layers_to_transform", self.layers_to_transform,
                f"None when target_modules is one string ({self.target_modules!r}), as in peft; list the module names",
            )

    @property
    def scale(self) -> float:
        return self.scale_of(self.r, self.alpha)

    def scale_of(self, r: int, alpha: float) -> float:
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def rank_and_alpha(self, module_name: str) -> tuple[int, float]:
        """The rank and alpha of the adapter on ``module_name`` (rank_pattern / alpha_pattern applied)."""
        r_key = pattern_key(self.rank_pattern, module_name)
        alpha_key = pattern_key(self.alpha_pattern, module_name)
        return (
            self.r if r_key is None else self.rank_pattern[r_key],
            self.alpha if alpha_key is None else self.alpha_pattern[alpha_key],
        )


def _normalise_common(config) -> None:
    """The targeting fields every layer method has: target_modules, exclude_modules, modules_to_save."""
    name = type(config).__name__
    object.__setattr__(config, "target_modules", _normalise_targets(name, "target_modules", config.target_modules))
    object.__setattr__(config, "exclude_modules", _optional_targets(name, "exclude_modules", config.exclude_modules))
    if isinstance(config.modules_to_save, str):
        _fail(name, "modules_to_save", config.modules_to_save, "a list of module names")
    object.__setattr__(
        config, "modules_to_save", _normalise_targets(name, "modules_to_save", config.modules_to_save or (), allow_empty=True)
    )


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
            Matched as a plain suffix of the name, as in peft (``"o"`` also selects ``wo``).
        modules_to_save: modules trained in full next to the adapter (each gets its own copy).
        exclude_modules: names (or one regex) of modules never to adapt.
    """

    target_modules: TargetModules = ("k", "v", "wo")
    feedforward_modules: TargetModules = ("wo",)
    modules_to_save: tuple[str, ...] = ()
    exclude_modules: Optional[TargetModules] = None

    def __post_init__(self) -> None:
        name = type(self).__name__
        _normalise_common(self)
        object.__setattr__(
            self,
            "feedforward_modules",
            _normalise_targets(name, "feedforward_modules", self.feedforward_modules, allow_empty=True),
        )
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

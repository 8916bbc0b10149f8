"""LoRA: a trainable low-rank update next to a frozen linear layer (Hu et al., 2021).

    y = base(x) + s * B A dropout(x),    A: (r, in),  B: (out, r),  s = alpha / r
                                                                    (alpha / sqrt(r) with rsLoRA)

The base is any ``nn.Linear``, a transformers ``Conv1D`` (GPT-2's; peftcore.weights transposes its
weight, so nothing here differs), or an ``NF4Linear`` (that is QLoRA: no extra class).

Inits (``B A`` is the starting update):
  kaiming   A ~ kaiming-uniform(a=sqrt(5)), B = 0           -> the model starts unchanged
  gaussian  A ~ N(0, (1/r)^2),            B = 0             -> the model starts unchanged
  pissa     W = U S V^T; A = sqrt(S_r / s) V_r^T, B = U_r sqrt(S_r / s); W <- W - s B A
            (Meng et al., 2024; ``pissa_niter_<N>`` uses torch.svd_lowrank with N iterations)
  olora     W = Q R; A = R[:r], B = Q[:, :r]; W <- W - s B A          (Büyükakyüz, 2024)
  lora_ga   2r singular directions of the weight's gradient G ~= U S V^T split between A and B;
            W <- W - s B A      (Wang et al., 2024; peftcore.lora_ga, which estimates G)
  loftq     alternate W's NF4 quantization Q and a rank-r SVD of W - Q (``loftq_iter`` times);
            the base becomes NF4(Q), s B A the SVD    (Li et al., 2023; peftcore.loftq)
PiSSA and OLoRA move the principal part of W into the adapter, so the base is left holding the
residual and the layer's output is unchanged at step 0 (up to float rounding). ``pissa_niter_<N>``
is randomised, so the layer keeps its starting factors (A0, B0): an adapter relative to the
original base is then ``[A; A0]``, ``[B, -B0]`` of rank 2r (``s (B A - B0 A0)``), which is how
it is saved; so is LoRA-GA's, which depends on training data. The PiSSA and OLoRA factors are
computed in ``peftcore.lora_init``.

Over a dense base (nn.Linear or Conv1D) the layer runs as one autograd node,
``peftcore.kernels.lora.FusedLoRA``, with its own backward (and, while training on the CPU,
dropout drawn by position).
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from peftcore import loftq, lora_ga
from peftcore.config import (
    check_pattern,
    fail,
    layer_indices,
    normalise_common,
    normalise_targets,
    positive_int,
    positive_number,
)
from peftcore.contract import AdapterLayer, LayerMethod
from peftcore.kernels.dropout import dropped_positions
from peftcore.kernels.lora import FusedLoRA
from peftcore.lora_init import olora_factors, pissa_factors
from peftcore.matching import TargetModules, pattern_key
from peftcore.weights import (
    adapter_device_dtype,
    dense_weight,
    in_features,
    is_dense,
    out_features,
    read_weight,
    write_weight,
)

__all__ = ["LoRA", "LoRAConfig", "LoRALinear"]

LORA_INITS = ("kaiming", "gaussian", "pissa", "pissa_niter_<N>", "olora", "lora_ga", "loftq")


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
        init: ``kaiming`` | ``gaussian`` | ``pissa`` | ``pissa_niter_<N>`` | ``olora`` | ``lora_ga``
            (the last needs ``peftcore.lora_ga.estimate_gradients`` first).
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
        lora_ga_direction, lora_ga_scale, lora_ga_stable_gamma: LoRA-GA's choices (peft's
            ``LoraGAConfig`` fields ``direction``, ``scale``, ``stable_gamma``): peftcore.lora_ga.
        loftq_iter: with ``init="loftq"``, the alternations of quantization and SVD (peft's
            ``LoftQConfig.loftq_iter``): peftcore.loftq.
    """

    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    target_modules: TargetModules = ("q", "v")
    init: str = "kaiming"
    use_rslora: bool = False
    modules_to_save: tuple[str, ...] = ()
    exclude_modules: TargetModules | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    layers_to_transform: tuple[int, ...] | None = None
    layers_pattern: tuple[str, ...] | None = None
    lora_ga_direction: str = "ArB2r"
    lora_ga_scale: str = "stable"
    lora_ga_stable_gamma: float = 16
    loftq_iter: int = 1

    def __post_init__(self) -> None:
        name = type(self).__name__
        positive_int(name, "r", self.r)
        positive_int(name, "loftq_iter", self.loftq_iter)
        if self.lora_ga_direction not in lora_ga.DIRECTIONS:
            fail(
                name, "lora_ga_direction", self.lora_ga_direction, "one of " + " | ".join(lora_ga.DIRECTIONS)
            )
        if self.lora_ga_scale not in lora_ga.SCALES:
            fail(name, "lora_ga_scale", self.lora_ga_scale, "one of " + " | ".join(lora_ga.SCALES))
        positive_number(name, "lora_ga_stable_gamma", self.lora_ga_stable_gamma)
        positive_number(name, "alpha", self.alpha)
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            fail(name, "dropout", self.dropout, "a number in [0, 1)")
        if not _is_lora_init(self.init):
            fail(name, "init", self.init, "one of " + " | ".join(LORA_INITS))
        normalise_common(self)
        object.__setattr__(
            self, "rank_pattern", check_pattern(name, "rank_pattern", self.rank_pattern, positive_int)
        )
        object.__setattr__(
            self, "alpha_pattern", check_pattern(name, "alpha_pattern", self.alpha_pattern, positive_number)
        )
        object.__setattr__(self, "layers_to_transform", layer_indices(name, self.layers_to_transform))
        if isinstance(self.layers_pattern, str):
            object.__setattr__(self, "layers_pattern", (self.layers_pattern,))
        if self.layers_pattern is not None:
            object.__setattr__(
                self, "layers_pattern", normalise_targets(name, "layers_pattern", self.layers_pattern)
            )
            if self.layers_to_transform is None:
                fail(
                    name, "layers_pattern", self.layers_pattern, "None unless layers_to_transform is set too"
                )
        if self.layers_to_transform is not None and isinstance(self.target_modules, str):
            fail(
                name,
                "layers_to_transform",
                self.layers_to_transform,
                f"None when target_modules is one string ({self.target_modules!r}), as in peft; list the module names",
            )

    @property
    def scale(self) -> float:
        return self.scale_of(self.r, self.alpha)

    def scale_of(self, r: int, alpha: float) -> float:
        return lora_scale(r, alpha, self.use_rslora)

    def rank_and_alpha(self, module_name: str) -> tuple[int, float]:
        """The rank and alpha of the adapter on ``module_name`` (rank_pattern / alpha_pattern applied)."""
        r_key = pattern_key(self.rank_pattern, module_name)
        alpha_key = pattern_key(self.alpha_pattern, module_name)
        return (
            self.r if r_key is None else self.rank_pattern[r_key],
            self.alpha if alpha_key is None else self.alpha_pattern[alpha_key],
        )


def lora_scale(r: int, alpha: float, use_rslora: bool) -> float:
    """s = alpha / r, or alpha / sqrt(r) with rsLoRA: the one place the scale is computed."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def _is_lora_init(init: object) -> bool:
    if init in ("kaiming", "gaussian", "pissa", "olora", "lora_ga", "loftq"):
        return True
    match = re.fullmatch(r"pissa_niter_(\d+)", init) if isinstance(init, str) else None
    return match is not None and int(match.group(1)) >= 0


class LoRALinear(AdapterLayer):
    """Wraps ``base`` (kept as ``self.base``, frozen) with a rank-``r`` update."""

    def __init__(
        self,
        base: nn.Module,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        init: str = "kaiming",
        use_rslora: bool = False,
        initialise: bool = True,
    ) -> None:
        """``initialise=False`` leaves A and B as nn.Linear makes them and the base untouched;
        ``initialise()`` runs the init later (``load_adapter`` does, after checking the file)."""
        super().__init__(base)
        self.r = r
        self.alpha = alpha
        self.scale = lora_scale(r, alpha, use_rslora)
        self.init = init
        self.lora_ga_options = ("ArB2r", "stable", 16.0)  # direction, scale, gamma: set by LoRA.wrap
        self.loftq_iter = 1  # LoftQ's alternations: set by LoRA.wrap
        # The starting factors A0, B0 of a randomised (pissa_niter) or data-dependent (lora_ga)
        # init; None otherwise.
        self.register_buffer("initial_A", None, persistent=False)
        self.register_buffer("initial_B", None, persistent=False)
        device, dtype = adapter_device_dtype(base)
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if initialise:
            self.initialise()

    def adapter_params(self) -> dict[str, nn.Parameter]:
        return {"lora_A.weight": self.lora_A.weight, "lora_B.weight": self.lora_B.weight}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled or self.merged:
            return self.base(x)
        if self.uses_fused_kernel(x):
            return self._fused_forward(x)
        result = self.base(x)
        # Under autocast the adapter's matmuls run in the autocast dtype whatever x's dtype is, so
        # casting x to the adapter's float32 first would only add two casts per layer.
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.lora_A.weight.dtype)
        update = self.lora_B(self.lora_A(self.dropout(x)))
        if update.dtype == result.dtype:
            return torch.add(result, update, alpha=self.scale)  # one kernel for the scale and the sum
        return result + (update * self.scale).to(result.dtype)

    def forward_rows(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """A mixed batch's rows: the base's output plus s B A dropout(x), as peft adds it."""
        update = self.lora_B(self.lora_A(self.dropout(x.to(self.lora_A.weight.dtype))))
        return base_out + (update * self.scale).to(base_out.dtype)

    def uses_fused_kernel(self, x: torch.Tensor) -> bool:
        """Whether ``forward(x)`` (adapter active, not merged) runs as one ``FusedLoRA`` node
        (peftcore/kernels/lora.py): a dense base (nn.Linear, or a Conv1D, whose weight the kernel
        gets as an (out, in) view from peftcore.weights), dropout only where it is drawn by position
        (the CPU; on accelerators torch's own is cheap), and one dtype for everything (or autocast
        choosing it)."""
        if not is_dense(self.base) or (self._dropping() and x.device.type != "cpu"):
            return False
        return (
            torch.is_autocast_enabled(x.device.type)
            or x.dtype == self.base.weight.dtype == self.lora_A.weight.dtype
        )

    def _dropping(self) -> bool:
        return self.training and isinstance(self.dropout, nn.Dropout) and self.dropout.p > 0

    def _fused_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The base and the update in one autograd node: see FusedLoRA."""
        weight = dense_weight(self.base, self.base.weight.dtype)  # (out, in): a Conv1D's, transposed (a view)
        tensors = (x, weight, self.base.bias, self.lora_A.weight, self.lora_B.weight)
        drop, keep_scale = None, 1.0
        if self._dropping():
            drop, keep_scale = dropped_positions(x.numel(), self.dropout.p), 1.0 / (1.0 - self.dropout.p)
        device = x.device.type
        if not torch.is_autocast_enabled(device):
            return FusedLoRA.apply(*tensors, self.scale, drop, keep_scale)
        # What autocast does to each matmul: every operand in its dtype, the result too.
        dtype = torch.get_autocast_dtype(device)
        with torch.autocast(device, enabled=False):
            return FusedLoRA.apply(
                *(t if t is None else t.to(dtype) for t in tensors), self.scale, drop, keep_scale
            )

    def delta_weight(self) -> torch.Tensor:
        """``s * B @ A``, the update as a dense (out, in) float32 matrix."""
        return self.scale * (self.lora_B.weight.float() @ self.lora_A.weight.float())

    @torch.no_grad()
    def merge(self) -> None:
        """W <- W + s B A; forward then runs the base alone."""
        if not self.merged:
            if self.init == "loftq":  # LoftQ's Q is the adapter's base: kept, so unmerge restores it exactly
                self.quantized_before_merge = {k: v.clone() for k, v in self.base.state_dict().items()}
            write_weight(self.base, read_weight(self.base) + self.delta_weight())
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W <- W - s B A: the inverse of merge, exact up to float rounding (lossy on NF4; exact for
        LoftQ, whose quantized base is kept while merged)."""
        if self.merged:
            kept = self.__dict__.pop("quantized_before_merge", None)
            if kept is not None:
                self.base.load_state_dict(kept)
            else:
                write_weight(self.base, read_weight(self.base) - self.delta_weight())
            self.merged = False

    @torch.no_grad()
    def initialise(self) -> None:
        """Set A and B by ``self.init`` (see the module docstring); PiSSA and OLoRA also rewrite the base."""
        init = self.init
        if init == "kaiming":
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B.weight)
        elif init == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1 / self.r)
            nn.init.zeros_(self.lora_B.weight)
        elif init.startswith("pissa"):
            niter = None if init == "pissa" else int(init.removeprefix("pissa_niter_"))
            self._move_principal_part(*pissa_factors(read_weight(self.base), self.r, self.scale, niter))
            if niter is not None:  # randomised: keep the starting factors (see the module docstring)
                self.initial_A, self.initial_B = self.lora_A.weight.clone(), self.lora_B.weight.clone()
        elif init == "olora":
            self._move_principal_part(*olora_factors(read_weight(self.base), self.r))
        elif init == "loftq":
            self._start_loftq()
        elif init == "lora_ga":
            factors = lora_ga.take_start(self.base, self.r, self.scale, self.lora_ga_options)
            # As peft: the factors in the adapter's dtype first, so that the residual matches them.
            A, B = (f.to(self.lora_A.weight.dtype).float() for f in factors)
            self._move_principal_part(A, B)
            self.initial_A, self.initial_B = self.lora_A.weight.clone(), self.lora_B.weight.clone()
        else:
            raise ValueError(f"unknown LoRA init {init!r}; use one of {' | '.join(LORA_INITS)}")

    def _start_loftq(self) -> None:
        """Quantize the base with LoftQ (peftcore.loftq): the base becomes NF4(Q), s B A = L R."""
        if not is_dense(self.base):
            raise ValueError(
                f"init='loftq' quantizes the base itself from its full-precision weight; this base is already "
                f"{type(self.base).__name__}: inject LoftQ into the model before (instead of) peftcore.quantize"
            )
        state, L, R = loftq.loftq_factors(read_weight(self.base), self.r, self.loftq_iter)
        root = math.sqrt(self.scale)
        self.lora_A.weight.copy_(R / root)
        self.lora_B.weight.copy_(L / root)
        self.base = loftq.quantized_base(self.base, state)

    def _move_principal_part(self, A: torch.Tensor, B: torch.Tensor) -> None:
        """Set the adapter to (A, B) and leave the base holding W - s B A."""
        self.lora_A.weight.copy_(A)
        self.lora_B.weight.copy_(B)
        write_weight(self.base, read_weight(self.base) - self.scale * (B @ A))


def changes_base(init: str | None) -> bool:
    """Whether ``init`` leaves the base holding a residual (PiSSA, OLoRA, LoRA-GA) or its
    quantization (LoftQ)."""
    return isinstance(init, str) and (init.startswith("pissa") or init in ("olora", "lora_ga", "loftq"))


class LoRA(LayerMethod):
    """LoRA as a method: wraps each target in a LoRALinear with its rank and alpha."""

    config = LoRAConfig
    layer = LoRALinear
    identity_at_init = True  # B = 0 (or, for PiSSA/OLoRA, the residual plus the principal part)
    loraplus_fast = ("lora_B.weight",)  # the B factor, which LoRA+ trains at ratio * lr

    def wrap(self, base: nn.Module, config: LoRAConfig, name: str, initialise: bool = True) -> LoRALinear:
        r, alpha = config.rank_and_alpha(name)
        layer = self.layer(base, r, alpha, config.dropout, config.init, config.use_rslora, initialise=False)
        layer.lora_ga_options = (config.lora_ga_direction, config.lora_ga_scale, config.lora_ga_stable_gamma)
        layer.loftq_iter = config.loftq_iter
        if initialise:
            layer.initialise()
        return layer

    def check(self, config: LoRAConfig, targets: dict[str, nn.Module]) -> None:
        """A rank_pattern / alpha_pattern key that matches no target changes nothing (peft >= 0.21
        warns too); an init that rewrites the base needs r <= min(out, in) on every target, checked
        before any is swapped."""
        if changes_base(config.init):
            for name, module in targets.items():
                r, smallest = config.rank_and_alpha(name)[0], min(in_features(module), out_features(module))
                if r > smallest:
                    raise ValueError(
                        f"init={config.init!r} takes r={r} directions of {name!r}, whose weight has {smallest}: lower r "
                        "(or rank_pattern for it)"
                    )
        for field_name in ("rank_pattern", "alpha_pattern"):
            unused = [
                key
                for key in getattr(config, field_name)
                if not any(pattern_key({key: 0}, n) for n in targets)
            ]
            if unused:
                warnings.warn(
                    f"{field_name} keys {unused} match none of the {len(targets)} adapted modules",
                    stacklevel=4,
                )

    def differs(self, layer: LoRALinear, name: str, config: LoRAConfig) -> str | None:
        """What the layer computes differently from what ``config`` gives ``name``, or None."""
        r, alpha = config.rank_and_alpha(name)
        if layer.r != r or not math.isclose(layer.scale, config.scale_of(r, alpha), rel_tol=1e-9):
            return f"{name!r} has rank {layer.r} and scale {layer.scale:g} here; the file gives rank {r}, scale {config.scale_of(r, alpha):g}"
        if changes_base(layer.init) != changes_base(config.init) or (
            changes_base(config.init) and layer.init != config.init
        ):
            return f"{name!r} was initialised with {layer.init!r} here; the file's adapter expects {config.init!r}"
        return None

"""LoRA: a trainable low-rank update next to a frozen linear layer (Hu et al., 2021).

    y = base(x) + s * B A dropout(x),    A: (r, in),  B: (out, r),  s = alpha / r
                                                                    (alpha / sqrt(r) with rsLoRA)

The base is any ``nn.Linear``, or an ``NF4Linear`` (that is QLoRA: no extra class).

Inits (``B A`` is the starting update):
  kaiming   A ~ kaiming-uniform(a=sqrt(5)), B = 0           -> the model starts unchanged
  gaussian  A ~ N(0, (1/r)^2),            B = 0             -> the model starts unchanged
  pissa     W = U S V^T; A = sqrt(S_r / s) V_r^T, B = U_r sqrt(S_r / s); W <- W - s B A
            (Meng et al., 2024; ``pissa_niter_<N>`` uses torch.svd_lowrank with N iterations)
  olora     W = Q R; A = R[:r], B = Q[:, :r]; W <- W - s B A          (Büyükakyüz, 2024)
PiSSA and OLoRA move the principal part of W into the adapter, so the base is left holding the
residual and the layer's output is unchanged at step 0 (up to float rounding).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from peftcore.config import LoRAConfig
from peftcore.weights import adapter_device_dtype, read_weight, write_weight


class LoRALinear(nn.Module):
    """Wraps ``base`` (kept as ``self.base``, frozen) with a rank-``r`` update."""

    def __init__(
        self,
        base: nn.Module,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        init: str = "kaiming",
        use_rslora: bool = False,
    ) -> None:
        super().__init__()
        self.base = base
        self.r = r
        self.alpha = alpha
        self.scale = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.merged = False
        self.disabled = False
        for param in base.parameters():
            param.requires_grad_(False)

        device, dtype = adapter_device_dtype(base)
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=device, dtype=dtype)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self._initialise(init)

    @classmethod
    def from_config(cls, base: nn.Module, config: LoRAConfig) -> "LoRALinear":
        return cls(base, config.r, config.alpha, config.dropout, config.init, config.use_rslora)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:
        """The base's weight: model code reads it (T5's feed-forward casts to ``wo.weight.dtype``)."""
        return self.base.weight

    def adapter_params(self) -> dict[str, nn.Parameter]:
        return {"lora_A.weight": self.lora_A.weight, "lora_B.weight": self.lora_B.weight}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        if self.disabled or self.merged:
            return result
        # Under autocast the adapter's matmuls run in the autocast dtype whatever x's dtype is, so
        # casting x to the adapter's float32 first would only add two casts per layer.
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.lora_A.weight.dtype)
        update = self.lora_B(self.lora_A(self.dropout(x)))
        if update.dtype == result.dtype:
            return torch.add(result, update, alpha=self.scale)  # one kernel for the scale and the sum
        return result + (update * self.scale).to(result.dtype)

    def delta_weight(self) -> torch.Tensor:
        """``s * B @ A``, the update as a dense (out, in) float32 matrix."""
        return self.scale * (self.lora_B.weight.float() @ self.lora_A.weight.float())

    @torch.no_grad()
    def merge(self) -> None:
        """W <- W + s B A; forward then runs the base alone."""
        if not self.merged:
            write_weight(self.base, read_weight(self.base) + self.delta_weight())
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W <- W - s B A: the inverse of merge, exact up to float rounding (lossy on NF4)."""
        if self.merged:
            write_weight(self.base, read_weight(self.base) - self.delta_weight())
            self.merged = False

    @torch.no_grad()
    def _initialise(self, init: str) -> None:
        if init == "kaiming":
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B.weight)
        elif init == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1 / self.r)
            nn.init.zeros_(self.lora_B.weight)
        elif init.startswith("pissa"):
            self._move_principal_part(*self._pissa_factors(init))
        elif init == "olora":
            self._move_principal_part(*self._olora_factors())
        else:
            raise ValueError(f"unknown LoRA init {init!r}; use kaiming, gaussian, pissa, pissa_niter_<N> or olora")

    def _pissa_factors(self, init: str) -> tuple[torch.Tensor, torch.Tensor]:
        weight = read_weight(self.base)
        if init == "pissa":
            U, S, Vh = torch.linalg.svd(weight, full_matrices=False)
            U, S, Vh = U[:, : self.r], S[: self.r], Vh[: self.r]
        else:
            niter = int(init.removeprefix("pissa_niter_"))
            U, S, V = torch.svd_lowrank(weight, q=self.r, niter=niter)
            Vh = V.T
        root = torch.sqrt(S / self.scale)
        return root[:, None] * Vh, U * root[None, :]  # A, B: s * B @ A == U_r S_r V_r^T

    def _olora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        Q, R = torch.linalg.qr(read_weight(self.base))
        return R[: self.r], Q[:, : self.r]

    def _move_principal_part(self, A: torch.Tensor, B: torch.Tensor) -> None:
        """Set the adapter to (A, B) and leave the base holding W - s B A."""
        self.lora_A.weight.copy_(A)
        self.lora_B.weight.copy_(B)
        write_weight(self.base, read_weight(self.base) - self.scale * (B @ A))

"""DoRA: weight-decomposed low-rank adaptation (Liu et al., 2024), LoRA's pieces plus a magnitude.

    W' = m * (W + s B A) / ||W + s B A||_row        m: (out,), trained; ||.||_row: each row's L2 norm

The direction ``W + s B A`` is LoRA's (its A, B, inits and rsLoRA); ``m`` starts at the row norms,
so the model starts unchanged. As the paper recommends (section 4.3), the norm is treated as a
constant in backward (it is detached). Forward, in peft's order of operations:

    y = base(x) + (m / n - 1) * W x + (m / n) * s B A dropout(x),      n = ||W + s B A||_row

where ``W x`` is the base's output without its bias (the bias as the base added it: an NF4 base
adds it in its compute dtype, as bitsandbytes' Linear4bit does) or, while dropout is active,
``W dropout(x)``, as peft computes it. Over an NF4 base (QDoRA) W is the dequantized weight.
Merging writes ``W' `` into the base and keeps ``n`` to undo it exactly: ``W = W' * n / m - s B A``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from peftcore import lora
from peftcore.weights import adapter_device_dtype, added_bias, dense_weight, read_weight, write_weight

__all__ = ["DoRA", "DoRAConfig", "DoRALinear"]


@dataclass(frozen=True)
class DoRAConfig(lora.LoRAConfig):
    """DoRA (Liu et al., 2024): LoRA's fields, with a learned magnitude per output row."""


class DoRALinear(lora.LoRALinear):
    """A LoRALinear whose update is renormalised row by row and rescaled by ``magnitude``."""

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
        super().__init__(base, r, alpha, dropout, init, use_rslora, initialise=False)
        device, dtype = adapter_device_dtype(base)
        self.magnitude = nn.Parameter(torch.ones(self.out_features, device=device, dtype=dtype))
        self.register_buffer("merged_norm", None, persistent=False)  # n at merge time, to unmerge exactly
        if initialise:
            self.initialise()

    def adapter_params(self) -> dict[str, nn.Parameter]:
        return {**super().adapter_params(), "magnitude": self.magnitude}

    @torch.no_grad()
    def initialise(self) -> None:
        """LoRA's init, then m = ||W + s B A||_row: the model starts unchanged."""
        super().initialise()
        self.magnitude.copy_(self.weight_norm())

    def weight_norm(self) -> torch.Tensor:
        """n = ||W + s B A||_row in float32, without gradient."""
        with torch.no_grad():
            return torch.linalg.norm(read_weight(self.base) + self.delta_weight(), dim=1)

    def uses_fused_kernel(self, x: torch.Tensor) -> bool:
        """Never: DoRA's forward is its own (LoRA's ``FusedLoRA`` has no magnitude)."""
        return False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        if self.disabled or self.merged:
            return result
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.lora_A.weight.dtype)
        weight = dense_weight(self.base, x.dtype)
        with torch.no_grad():  # the norm is a constant in backward (the paper's section 4.3)
            update_weight = (self.lora_B.weight @ self.lora_A.weight).to(x.dtype)
            norm = torch.linalg.norm(weight + self.scale * update_weight, dim=1)
        factor = self.magnitude / norm
        if self.training and isinstance(self.dropout, nn.Dropout):
            x = self.dropout(x)
            base_out = F.linear(x, weight)
        else:
            bias = added_bias(self.base)  # in the dtype the base added it (an NF4 base: its compute dtype)
            base_out = result if bias is None else result - bias
        update = self.lora_B(self.lora_A(x))
        return result + ((factor - 1) * base_out + factor * update * self.scale).to(result.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """W <- m * (W + s B A) / n."""
        if not self.merged:
            self.merged_norm = self.weight_norm()
            factor = (self.magnitude.float() / self.merged_norm)[:, None]
            write_weight(self.base, factor * (read_weight(self.base) + self.delta_weight()))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W <- W' * n / m - s B A (exact up to rounding; lossy on NF4)."""
        if self.merged:
            factor = (self.magnitude.float() / self.merged_norm)[:, None]
            write_weight(self.base, read_weight(self.base) / factor - self.delta_weight())
            self.merged_norm, self.merged = None, False


class DoRA(lora.LoRA):
    """DoRA as a method: LoRA's wrap, check and differs, with DoRA's config and layer."""

    config = DoRAConfig
    layer = DoRALinear
    identity_at_init = True  # LoRA's, and m starts at the row norms

"""DoRA: weight-decomposed low-rank adaptation (Liu et al., 2024), LoRA's pieces plus a magnitude.

    W' = m * (W + s B A) / ||W + s B A||_row        m: (out,), trained; ||.||_row: each row's L2 norm

The direction ``W + s B A`` is LoRA's (its A, B, inits and rsLoRA); ``m`` starts at the row norms,
so the model starts unchanged. As the paper recommends (section 4.3), the norm is treated as a
constant in backward (it is detached). Forward, in peft's order of operations:

    y = base(x) + (m / n - 1) * W x + (m / n) * s B A dropout(x),      n = ||W + s B A||_row

where ``W x`` is the base's output without its bias (the bias as the base added it: an NF4 base
adds it in its compute dtype, as bitsandbytes' Linear4bit does) or, while dropout is active,
``W dropout(x)``, as peft computes it. Without dropout this is ``f W x + bias + s (A x) (f B)^T``
with ``f = m / n``, computed so (equal up to rounding). Over an NF4 base (QDoRA) W is the dequantized weight.
The row norms come from ``n^2 = ||W||^2 + 2 s rowdot(W, B A) + s^2 ||B A||^2`` (row by row;
:meth:`DoRALinear.row_norm`), with no out x in temporary. Merging writes ``W' `` into the base and keeps ``n`` to undo it exactly: ``W = W' * n / m - s B A``.
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

    @torch.no_grad()  # the norm is a constant in backward (the paper's section 4.3)
    def row_norm(self, weight: torch.Tensor) -> torch.Tensor:
        """n = ||W + s B A||_row for the (out, in) ``weight``, without forming an out x in matrix:

            n^2 = ||W||^2_row + 2 s rowsum((W A^T) * B) + s^2 rowsum((B (A A^T)) * B)

        (the middle term is rowdot(W, B A), the last ||B A||^2_row), so the cost is two reads of W
        and products of width r, where W + s B A would be two out x in temporaries and three passes."""
        exact = torch.promote_types(weight.dtype, torch.float32)  # the sums in float32 at least
        a = self.lora_A.weight.to(weight.dtype)
        b = self.lora_B.weight.to(exact)
        cross = ((weight @ a.T).to(exact) * b).sum(dim=1)
        a = a.to(exact)
        update = ((b @ (a @ a.T)) * b).sum(dim=1)
        base = torch.linalg.vector_norm(weight, dim=1, dtype=exact).square()
        return (base + (2 * self.scale) * cross + self.scale**2 * update).clamp_min(0).sqrt()

    def uses_fused_kernel(self, x: torch.Tensor) -> bool:
        """Never: DoRA's forward is its own (LoRA's ``FusedLoRA`` has no magnitude)."""
        return False

    def forward_rows(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """A mixed batch's rows: DoRA's whole output on them (it rescales the base's; peft has no
        DoRA in a mixed batch)."""
        return self(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        if self.disabled or self.merged:
            return result
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.lora_A.weight.dtype)
        weight = dense_weight(self.base, x.dtype)
        norm = self.row_norm(weight)
        factor = self.magnitude / norm
        if self.training and isinstance(self.dropout, nn.Dropout):
            x = self.dropout(x)
            base_out = F.linear(x, weight)
            update = self.lora_B(self.lora_A(x))
            return result + ((factor - 1) * base_out + factor * update * self.scale).to(result.dtype)
        # Without dropout W x is the base's output less its bias, and the sum regroups as
        #     base + (f - 1) W x + f s B A x = f W x + bias + s (A x) (f B)^T
        # with f folded into B (out x r) and the low-rank product added by the matmul itself
        # (addmm): one element-wise pass over the output in forward (and two in backward) where
        # peft's order takes five.
        bias = added_bias(self.base)  # in the dtype the base added it (an NF4 base: its compute dtype)
        scaled = result * factor if bias is None else torch.addcmul(bias, result - bias, factor)
        low_rank = self.lora_A(x)
        out = torch.addmm(
            scaled.reshape(-1, scaled.shape[-1]),
            low_rank.reshape(-1, low_rank.shape[-1]),
            (factor[:, None] * self.lora_B.weight).t(),
            alpha=self.scale,
        )
        return out.view(scaled.shape).to(result.dtype)

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

    def check(self, config: DoRAConfig, targets: dict[str, nn.Module]) -> None:
        if config.init in ("lora_ga", "loftq"):
            raise ValueError(
                f"DoRAConfig(init={config.init!r}): {config.init} with DoRA is not supported (not checked against "
                f"peft); use LoRAConfig(init={config.init!r}) or another DoRA init"
            )
        super().check(config, targets)

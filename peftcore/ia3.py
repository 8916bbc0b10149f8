"""(IA)^3: learned vectors that rescale a frozen layer's activations (Liu et al., 2022).

    feed-forward target:  y = W (l * x) + b      l: (in_features,)
    any other target:     y = l * (W x + b)      l: (out_features,)

``l`` starts at ones, so the model starts unchanged. Merging folds ``l`` into the weight's
columns (feed-forward) or rows and bias (otherwise); unmerging divides it out again, so a zero
in ``l`` cannot be merged.
"""

from __future__ import annotations

import torch
from torch import nn

from peftcore.weights import adapter_device_dtype, read_weight, write_weight


class IA3Scaler(nn.Module):
    """Wraps ``base`` (kept as ``self.base``, frozen) with a learned scaling vector ``self.scale``."""

    def __init__(self, base: nn.Module, feedforward: bool) -> None:
        super().__init__()
        self.base = base
        self.feedforward = feedforward
        self.merged = False
        self.disabled = False
        for param in base.parameters():
            param.requires_grad_(False)
        device, dtype = adapter_device_dtype(base)
        size = base.in_features if feedforward else base.out_features
        self.scale = nn.Parameter(torch.ones(size, device=device, dtype=dtype))

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
        return {"scale": self.scale}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled or self.merged:
            return self.base(x)
        # Type promotion multiplies in the vector's float32 (what an explicit up-cast would do) in one kernel.
        if self.feedforward:
            return self.base((x * self.scale).to(x.dtype))
        result = self.base(x)
        return (result * self.scale).to(result.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        if bool((self.scale == 0).any()):
            zeros = int((self.scale == 0).sum())
            raise ValueError(
                f"cannot merge an IA3 vector with {zeros} zero entries: unmerge divides by it. "
                "Use unload(model, merge=True) if you never need to unmerge."
            )
        self._rescale(self.scale.float())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self._rescale(1.0 / self.scale.float())
            self.merged = False

    @torch.no_grad()
    def fold_into_base(self) -> None:
        """Merge for good (no unmerge will follow), so zero entries are allowed."""
        if not self.merged:
            self._rescale(self.scale.float())
            self.merged = True

    def _rescale(self, factor: torch.Tensor) -> None:
        weight = read_weight(self.base)
        if self.feedforward:
            write_weight(self.base, weight * factor[None, :])
            return
        write_weight(self.base, weight * factor[:, None])
        if self.base.bias is not None:
            self.base.bias.copy_((self.base.bias.float() * factor).to(self.base.bias.dtype))

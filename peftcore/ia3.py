"""(IA)^3: learned vectors that rescale a frozen layer's activations (Liu et al., 2022).

    feed-forward target:  y = W (l * x) + b      l: (in_features,)
    any other target:     y = l * (W x + b)      l: (out_features,)

``l`` starts at ones, so the model starts unchanged. Merging folds ``l`` into the weight's
columns (feed-forward) or rows and bias (otherwise); unmerging divides it out again, so a zero
in ``l`` cannot be merged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from peftcore.config import fail, normalise_common, normalise_targets
from peftcore.contract import AdapterLayer, LayerMethod
from peftcore.matching import TargetModules, ends_with, shown
from peftcore.weights import adapter_device_dtype, read_weight, write_weight

__all__ = ["IA3", "IA3Config", "IA3Scaler"]


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
    exclude_modules: TargetModules | None = None

    def __post_init__(self) -> None:
        name = type(self).__name__
        normalise_common(self)
        object.__setattr__(
            self,
            "feedforward_modules",
            normalise_targets(name, "feedforward_modules", self.feedforward_modules, allow_empty=True),
        )
        if isinstance(self.target_modules, tuple) and isinstance(self.feedforward_modules, tuple):
            stray = [m for m in self.feedforward_modules if m not in self.target_modules]
            if stray:
                fail(
                    name,
                    "feedforward_modules",
                    self.feedforward_modules,
                    f"a subset of target_modules {list(self.target_modules)} ({stray} are not targets)",
                )


class IA3Scaler(AdapterLayer):
    """Wraps ``base`` (kept as ``self.base``, frozen) with a learned scaling vector ``self.scale``."""

    def __init__(self, base: nn.Module, feedforward: bool) -> None:
        super().__init__(base)
        self.feedforward = feedforward
        device, dtype = adapter_device_dtype(base)
        size = self.in_features if feedforward else self.out_features
        self.scale = nn.Parameter(torch.ones(size, device=device, dtype=dtype))

    def adapter_params(self) -> dict[str, nn.Parameter]:
        return {"scale": self.scale}

    @torch.no_grad()
    def initialise(self) -> None:
        self.scale.fill_(1.0)

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


class IA3(LayerMethod):
    """(IA)^3 as a method: wraps each target in an IA3Scaler, feed-forward or not."""

    config = IA3Config
    layer = IA3Scaler
    identity_at_init = True  # the vectors start at ones

    def wrap(self, base: nn.Module, config: IA3Config, name: str, initialise: bool = True) -> IA3Scaler:
        """Feed-forward targets are those whose name ends with a feedforward_modules entry (peft's rule)."""
        return IA3Scaler(
            base, feedforward=bool(config.feedforward_modules) and ends_with(name, config.feedforward_modules)
        )

    def check(self, config: IA3Config, targets: dict[str, nn.Module]) -> None:
        """Every feedforward_modules entry must select one of the targets: otherwise it does nothing."""
        entries = config.feedforward_modules
        for entry in (entries,) if isinstance(entries, str) else entries:
            if not any(ends_with(name, entry if isinstance(entries, str) else (entry,)) for name in targets):
                raise ValueError(
                    f"feedforward_modules must be targets too; {entry!r} selects none of the {len(targets)} modules "
                    f"that target_modules={shown(config.target_modules)!r} selects"
                )

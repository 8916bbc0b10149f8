"""The base of the layer wrappers (LoRALinear, DoRALinear, IA3Scaler): what every wrapper has."""

from __future__ import annotations

import torch
from torch import nn


class AdapterLayer(nn.Module):
    """Wraps one linear layer ``base`` (frozen) with a trainable adapter.

    It stands where the linear layer stood, so it answers what model code reads from that module:
    ``in_features``, ``out_features`` and ``weight`` (T5's feed-forward casts to ``wo.weight.dtype``).
    A subclass adds its tensors, ``forward``, ``adapter_params``, ``initialise``, ``merge`` and
    ``unmerge``, reading and writing the base weight only through peftcore.weights.
    """

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base
        self.merged = False
        self.disabled = False
        for param in base.parameters():
            param.requires_grad_(False)

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
        """The trainable tensors, by their names in this module."""
        raise NotImplementedError

    def initialise(self) -> None:
        """Run the init (after ``load_adapter`` has checked a file: PiSSA rewrites the base)."""
        raise NotImplementedError

    def merge(self) -> None:
        raise NotImplementedError

    def unmerge(self) -> None:
        raise NotImplementedError

    def fold_into_base(self) -> None:
        """Merge for good (unload; no unmerge follows): the same as merge unless a method says otherwise."""
        self.merge()

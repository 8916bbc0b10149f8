"""Read and write a base layer's weight, whether it is stored in full (nn.Linear) or quantized.

Adapters that change the base (PiSSA/OLoRA init, merge, unmerge) go through these two
functions, so they work on any base that is either an ``nn.Linear`` or offers
``dequantize()`` / ``set_weight_()`` (``NF4Linear``). A quantized base is re-quantized on
write, which rounds: such merges are lossy.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class QuantizedLinear(Protocol):
    """A linear layer whose weight is stored quantized (``NF4Linear``): it has no ``weight``
    Parameter, reads it with ``dequantize`` and writes it with ``set_weight_`` (lossy)."""

    in_features: int
    out_features: int

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor: ...

    def set_weight_(self, weight: torch.Tensor) -> None: ...


def is_quantized(module: nn.Module) -> bool:
    """The one place that decides whether a layer's weight is stored quantized."""
    return isinstance(module, QuantizedLinear)


def is_linear(module: nn.Module) -> bool:
    """A layer an adapter can wrap: nn.Linear, or a quantized stand-in with the same interface."""
    return isinstance(module, nn.Linear) or is_quantized(module)


def read_weight(base: nn.Module) -> torch.Tensor:
    """The base's weight as a float32 (out_features, in_features) tensor (a copy)."""
    if is_quantized(base):
        return base.dequantize(torch.float32)
    return base.weight.detach().to(torch.float32).clone()


def dense_weight(base: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The base's weight in ``dtype`` for computing with (dequantized for a quantized base), no copy
    when it is already stored that way."""
    if is_quantized(base):
        return base.dequantize(dtype)
    return base.weight.to(dtype)


@torch.no_grad()
def write_weight(base: nn.Module, weight: torch.Tensor) -> None:
    """Store ``weight`` into the base in the base's own dtype (re-quantizing if need be)."""
    if is_quantized(base):
        base.set_weight_(weight)
    else:
        base.weight.copy_(weight.to(base.weight.dtype))


def adapter_device_dtype(base: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Where an adapter on this base lives: the base's device, float32 unless the base is float64.

    Adapters train in float32 even over a bf16/fp16/4-bit base (peft does the same by default),
    so their small updates are not rounded away.
    """
    tensor = next(iter(base.parameters()), None)
    if tensor is None or not tensor.is_floating_point():
        tensor = next(b for b in base.buffers())
    dtype = torch.float64 if tensor.dtype == torch.float64 else torch.float32
    return tensor.device, dtype

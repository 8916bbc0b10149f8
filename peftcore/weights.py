"""Read and write a base layer's weight, whether it is stored in full (nn.Linear, transformers'
Conv1D) or quantized: the one seam between the adapters and how a base stores its weight.

Above this module every weight is (out_features, in_features), as nn.Linear stores it. Adapters
that read or change the base (forward, PiSSA/OLoRA init, merge, unmerge) and what model code
reads from a layer (``in_features``, ``out_features``) go through these functions, so they work
on any base that is an ``nn.Linear``, a transformers ``Conv1D`` (GPT-2's transposed linear layer:
``y = x W + b`` with ``W`` stored as (in_features, out_features); it is transposed here, both
ways) or offers ``dequantize()`` / ``set_weight_()`` (``NF4Linear``). A quantized base is
re-quantized on write, which rounds: such merges are lossy.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D


@runtime_checkable
class QuantizedLinear(Protocol):
    """A linear layer whose weight is stored quantized (``NF4Linear``): it has no ``weight``
    Parameter, reads it with ``dequantize`` and writes it with ``set_weight_`` (lossy)."""

    in_features: int
    out_features: int
    compute_dtype: torch.dtype  # the dtype its forward computes in (and adds its bias in)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor: ...

    def set_weight_(self, weight: torch.Tensor) -> None: ...

    def hold_storage_as_parameters(self) -> None: ...  # for FSDP, which shards parameters only


def is_quantized(module: nn.Module) -> bool:
    """The one place that decides whether a layer's weight is stored quantized."""
    return isinstance(module, QuantizedLinear)


def is_transposed(module: nn.Module) -> bool:
    """Whether the layer stores its weight as (in_features, out_features): transformers' Conv1D
    (GPT-2's), which peft adapts with ``fan_in_fan_out``. The one place that recognises a Conv1D."""
    return isinstance(module, Conv1D)


def is_dense(module: nn.Module) -> bool:
    """A linear layer whose weight is one full-precision Parameter: nn.Linear itself (not a
    subclass such as bitsandbytes' Linear4bit, whose ``weight`` is packed) or a Conv1D."""
    return type(module) is nn.Linear or is_transposed(module)


def is_linear(module: nn.Module) -> bool:
    """A layer an adapter can wrap: nn.Linear, Conv1D, or a quantized stand-in with the same interface."""
    return isinstance(module, nn.Linear) or is_transposed(module) or is_quantized(module)


def in_features(base: nn.Module) -> int:
    """The size of the layer's input (Conv1D calls it ``nx``)."""
    return base.nx if is_transposed(base) else base.in_features


def out_features(base: nn.Module) -> int:
    """The size of the layer's output (Conv1D calls it ``nf``)."""
    return base.nf if is_transposed(base) else base.out_features


def read_weight(base: nn.Module) -> torch.Tensor:
    """The base's weight as a float32 (out_features, in_features) tensor (a contiguous copy)."""
    if is_quantized(base):
        return base.dequantize(torch.float32)
    weight = _as_stored(base, base.weight.detach()).to(torch.float32)
    return weight.clone(memory_format=torch.contiguous_format)


def dense_weight(base: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The base's (out_features, in_features) weight in ``dtype`` for computing with (dequantized
    for a quantized base; a transposed view of a Conv1D's), no copy when it is already stored that way."""
    if is_quantized(base):
        return base.dequantize(dtype)
    return _as_stored(base, base.weight).to(dtype)


@torch.no_grad()
def write_weight(base: nn.Module, weight: torch.Tensor) -> None:
    """Store the (out_features, in_features) ``weight`` into the base in the base's own dtype
    (re-quantizing if need be; transposed into a Conv1D)."""
    if is_quantized(base):
        base.set_weight_(weight)
    else:
        base.weight.copy_(_as_stored(base, weight).to(base.weight.dtype))


def _as_stored(base: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """A Conv1D's (in, out) weight as (out, in) and back (the transpose is its own inverse); as is otherwise."""
    return weight.t() if is_transposed(base) else weight


def added_bias(base: nn.Module) -> torch.Tensor | None:
    """The bias as the base adds it to its output, or None: a quantized base adds it in its compute
    dtype (bf16, say), as bitsandbytes' Linear4bit does, so ``base(x) - added_bias(base)`` is the
    base's ``W x`` without a bias's rounding left in it (DoRA needs ``W x``)."""
    bias = getattr(base, "bias", None)
    if bias is None or not is_quantized(base):
        return bias
    return bias.to(base.compute_dtype)


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

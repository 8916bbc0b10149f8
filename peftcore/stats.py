"""Parameter counts and memory footprint, the two efficiency figures every comparison reports."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from peftcore.weights import is_quantized


@dataclass(frozen=True)
class ParamCount:
    """Logical parameter counts: a 4-bit weight counts as its unpacked number of elements."""

    total: int
    trainable: int

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:  # the same line peft's print_trainable_parameters prints
        return (
            f"trainable params: {self.trainable:,d} || all params: {self.total:,d} "
            f"|| trainable%: {self.trainable_percent:.4f}"
        )


def count_parameters(model: nn.Module, stored: bool = False) -> ParamCount:
    """Counts each parameter once (tied weights too), plus the weight of every quantized layer
    (its logical elements, in place of its packed storage, even where that is held as parameters
    for sharding). A sharded parameter (FSDP2's DTensor) counts as its whole shape.

    ``stored=True`` counts a quantized weight as its stored elements instead, two 4-bit values
    per uint8 element: what transformers' ``num_parameters()`` reports for a bitsandbytes 4-bit
    model, and the convention of the study this project reproduces (t5-base QLoRA: 153,894,144
    where the logical count is 224,673,024)."""
    storage = {
        id(tensor)
        for module in model.modules()
        if is_quantized(module)
        for name, tensor in module.named_parameters(recurse=False)
        if name != "bias"
    }
    total = trainable = 0
    for param in model.parameters():
        if id(param) in storage:
            continue
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
    for module in model.modules():
        if is_quantized(module):  # NF4Linear: the frozen weight is stored packed
            total += module.weight_packed.numel() if stored else module.in_features * module.out_features
    return ParamCount(total=total, trainable=trainable)


def memory_footprint(model: nn.Module, quantization_state: bool = True) -> int:
    """Bytes of all parameters and buffers as stored (packed 4-bit weights and their
    quantization state included), each tensor counted once.

    ``quantization_state=False`` leaves out the quantized layers' scales (absmax, and with double
    quantization its 8-bit codes' scales and offset), which bitsandbytes keeps outside the module's
    tensors: what transformers' ``get_memory_footprint()`` reports for a bitsandbytes 4-bit model,
    and the study's convention."""
    state = {
        id(tensor)
        for module in model.modules()
        if is_quantized(module)
        for name, tensor in (*module.named_buffers(recurse=False), *module.named_parameters(recurse=False))
        if name in QUANTIZATION_STATE
    }
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return sum(
        t.numel() * t.element_size() for key, t in tensors.items() if quantization_state or key not in state
    )


# An NF4Linear's tensors other than its packed weight and bias: the scales that decode it.
QUANTIZATION_STATE = ("absmax", "absmax2", "absmax_offset")


def print_trainable_parameters(model: nn.Module) -> None:
    print(count_parameters(model))

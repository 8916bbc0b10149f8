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


def count_parameters(model: nn.Module) -> ParamCount:
    """Counts each parameter once (tied weights too), plus the weight of every quantized layer
    (its logical elements, in place of its packed storage, even where that is held as parameters
    for sharding). A sharded parameter (FSDP2's DTensor) counts as its whole shape."""
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
            total += module.in_features * module.out_features
    return ParamCount(total=total, trainable=trainable)


def memory_footprint(model: nn.Module) -> int:
    """Bytes of all parameters and buffers as stored (packed 4-bit weights and their
    quantization state included), each tensor counted once."""
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def print_trainable_parameters(model: nn.Module) -> None:
    print(count_parameters(model))

"""LoRA+ (Hayou et al., 2024): the B factor of a low-rank update learns faster than A.

    lr(B) = ratio * lr(A)         (the paper's eta_B / eta_A; its experiments use ratios near 16)

Which parameters get ``ratio * lr`` follows peft's ``create_loraplus_optimizer``: each layer's B
factors (a method names them in ``loraplus_fast``: LoRA's and DoRA's ``lora_B.weight``), and every
trainable one-dimensional parameter (DoRA's magnitudes, the norms of modules_to_save). Weight
decay follows the project's rule independently: matrices decay, vectors do not.
"""

from __future__ import annotations

from torch import nn

from peftcore import methods
from peftcore.surgery import adapter_layers


def fast_parameters(model: nn.Module) -> set[int]:
    """ids of the trainable parameters LoRA+ gives ``ratio * lr``."""
    fast = {id(p) for p in model.parameters() if p.requires_grad and p.dim() == 1}
    for _, layer in adapter_layers(model):
        for name in methods.for_layer(layer).loraplus_fast:
            fast.add(id(layer.get_parameter(name)))
    return fast


def param_groups(model: nn.Module, lr: float, weight_decay: float, ratio: float | None = None) -> list[dict]:
    """AdamW parameter groups: weight decay on matrices only, and with ``ratio`` LoRA+'s faster B."""
    if ratio is not None and not ratio > 0:
        raise ValueError(
            f"loraplus_lr_ratio must be a positive number (the paper uses about 16), got {ratio!r}"
        )
    fast = fast_parameters(model) if ratio is not None else set()
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for p in model.parameters():
        if p.requires_grad:
            groups.setdefault((p.dim() >= 2, id(p) in fast), []).append(p)
    return [
        {
            "params": params,
            "weight_decay": weight_decay if decays else 0.0,
            "lr": lr * ratio if is_fast else lr,
        }
        for (decays, is_fast), params in sorted(groups.items(), key=lambda item: (not item[0][0], item[0][1]))
    ]

"""LoRA-GA (Wang et al., 2024, "LoRA-GA: Low-Rank Adaptation with Gradient Approximation"): start
LoRA so that its first step moves the model as full fine-tuning's first step would.

With ``G`` the gradient of the loss w.r.t. a frozen weight ``W`` (out, in), averaged over a few
batches, and its randomised SVD ``G ~= U S V^T`` (``torch.svd_lowrank``, q = min(4r, out, in),
4 iterations), the factors take 2r singular directions, split between A and B by ``direction``:

    ArB2r (default)   A = V[:, :r]^T,        B = U[:, r:2r] S[r:2r]
    A2rBr             A = V[:, r:2r]^T,      B = U[:, :r] S[:r]
    ArBr              A = V[:, 1:2r:2]^T,    B = U[:, 0:2r:2] S[0:2r:2]
    random            r of the first 2r indices drawn at random, the same ones for A and B

then scaled by ``scale``: ``stable`` multiplies B by out^(1/4) / sqrt(gamma); ``weight_svd``
multiplies B by sigma_1(W) / S_B[0] (sigma_1 by svd_lowrank, q = r); ``gd_scale`` divides A and B
by the LoRA scale s; ``unit`` leaves them. The base keeps ``W - s B A``, so the model starts unchanged
(up to rounding), as with PiSSA. These are peft's ``init_lora_weights="lora_ga"`` choices and
defaults (``LoraGAConfig``), and both libraries draw the SVD's random matrices from torch's default
generator in the same order, so the same gradient and seed give the same factors.

Use::

    peftcore.lora_ga.estimate_gradients(model, config, train_step)   # train_step: forward + backward
    peftcore.inject(model, config)                                      # config.init == "lora_ga"

``estimate_gradients`` makes only the target weights require a gradient, runs ``train_step`` (which
may loop over several batches), and leaves each target's mean gradient (summed gradient / number of
backward passes through it) on the module for ``inject`` to use once. To rebuild a LoRA-GA model
without the data (resuming a run, evaluating a checkpoint), keep ``starting_factors(model)`` after
``inject`` and later call ``use_starting_factors(model, config, factors)`` instead of estimating:
``inject`` then starts from exactly those A0, B0 and base ``W - s B0 A0``. The starting factors depend on
the data and on random draws, so a LoRA-GA adapter is saved converted to a rank-2r adapter relative
to the original base (``s (B A - B0 A0)``), as peft's ``path_initial_model_for_weight_conversion``
writes it; a peft file saved with ``init_lora_weights="lora_ga"`` unconverted is refused on load.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import nn

from peftcore.matching import select_targets
from peftcore.weights import is_dense, is_transposed, read_weight

__all__ = [
    "DIRECTIONS",
    "GRADIENT_ATTRIBUTE",
    "SCALES",
    "START_ATTRIBUTE",
    "estimate_gradients",
    "lora_ga_factors",
    "starting_factors",
    "take_start",
    "use_starting_factors",
]

DIRECTIONS = ("ArB2r", "A2rBr", "ArBr", "random")
SCALES = ("stable", "weight_svd", "gd_scale", "unit")
GRADIENT_ATTRIBUTE = "lora_ga_gradient"  # where estimate_gradients leaves a target's mean gradient
START_ATTRIBUTE = "lora_ga_start"  # where use_starting_factors leaves a target's saved (A0, B0)


def lora_ga_factors(
    gradient: torch.Tensor,
    weight: torch.Tensor,
    r: int,
    lora_scale: float,
    direction: str = "ArB2r",
    scale: str = "stable",
    stable_gamma: float = 16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The starting (A, B), float32, from the (out, in) ``gradient`` of the (out, in) ``weight``."""
    if direction not in DIRECTIONS:
        raise ValueError(f"LoRA-GA direction must be one of {DIRECTIONS}, got {direction!r}")
    if scale not in SCALES:
        raise ValueError(f"LoRA-GA scale must be one of {SCALES}, got {scale!r}")
    gradient = gradient.float()
    U, S, V = torch.svd_lowrank(gradient, q=min(4 * r, *gradient.shape), niter=4)
    if 2 * r > S.numel():
        raise ValueError(
            f"LoRA-GA takes 2r = {2 * r} singular directions of a {tuple(gradient.shape)} gradient, "
            f"which has {S.numel()}: lower r"
        )
    if direction == "ArB2r":
        a_index, b_index = torch.arange(r), torch.arange(r, 2 * r)
    elif direction == "A2rBr":
        a_index, b_index = torch.arange(r, 2 * r), torch.arange(r)
    elif direction == "ArBr":
        a_index, b_index = torch.arange(1, 2 * r, 2), torch.arange(0, 2 * r, 2)
    else:
        a_index = b_index = torch.randperm(2 * r)[:r]
    A = V[:, a_index].T
    singular_b = S[b_index]
    B = U[:, b_index] * singular_b
    if scale == "stable":
        B = B * (gradient.shape[0] ** 0.25 / stable_gamma**0.5)
    elif scale == "weight_svd":
        top = torch.svd_lowrank(weight.float(), q=r, niter=4)[1][0]
        if singular_b[0] > 0:
            B = B * (top / singular_b[0])
    elif scale == "gd_scale":
        A, B = A / lora_scale, B / lora_scale
    return A.contiguous(), B.contiguous()


def estimate_gradients(model: nn.Module, config, train_step: Callable[[], object]) -> dict[str, torch.Tensor]:
    """Run ``train_step`` (forward and backward over one or more batches) with only the weights of
    ``config``'s targets requiring a gradient, and leave each target's mean gradient on it for
    ``inject``. Returns the gradients by module name. The model's train/eval mode and every
    parameter's ``requires_grad`` are restored; no other parameter gets a gradient."""
    modules = dict(model.named_modules())
    targets = select_targets(model, config)
    if not targets:
        raise ValueError("LoRA-GA: config.target_modules selects no module of this model")
    not_dense = [f"{n} ({type(modules[n]).__name__})" for n in targets if not is_dense(modules[n])]
    if not_dense:
        raise ValueError(
            f"LoRA-GA needs full-precision gradients of dense weights (nn.Linear, Conv1D); these are not: "
            f"{not_dense[:5]}. Estimate before quantizing, or use another init for a 4-bit base"
        )
    was_training = model.training
    wanted = {name: p.requires_grad for name, p in model.named_parameters()}
    passes = dict.fromkeys(targets, 0)
    hooks = []
    try:
        model.train()
        for param in model.parameters():
            param.requires_grad_(False)
        for name in targets:
            weight = modules[name].weight
            weight.grad = None
            weight.requires_grad_(True)
            hooks.append(modules[name].register_full_backward_hook(_counter(passes, name)))
        with torch.enable_grad(), warnings.catch_warnings():
            # The first targets' inputs (frozen embeddings) need no gradient; counting passes is all
            # the hooks do, so torch's note about that is noise here.
            warnings.filterwarnings("ignore", "Full backward hook is firing", UserWarning)
            train_step()
        gradients = {}
        for name in targets:
            weight = modules[name].weight
            if weight.grad is None or passes[name] == 0:
                raise ValueError(f"LoRA-GA: train_step ran no backward pass through {name!r}")
            gradient = (weight.grad.T if is_transposed(modules[name]) else weight.grad) / passes[name]
            gradients[name] = gradient
            setattr(modules[name], GRADIENT_ATTRIBUTE, gradient)
        return gradients
    finally:
        for hook in hooks:
            hook.remove()
        for name in targets:
            modules[name].weight.grad = None
        for name, param in model.named_parameters():
            param.requires_grad_(wanted[name])
        model.train(was_training)


def _counter(passes: dict[str, int], name: str):
    def count(module, grad_input, grad_output) -> None:
        passes[name] += 1

    return count


def take_start(
    base: nn.Module, r: int, lora_scale: float, options: tuple[str, str, float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The starting (A, B) of the LoRA layer over ``base``, from what was left on it: the saved
    factors of ``use_starting_factors``, else the gradient of ``estimate_gradients`` (with the
    ``options`` direction, scale, gamma). Either is used once."""
    start = getattr(base, START_ATTRIBUTE, None)
    if start is not None:
        delattr(base, START_ATTRIBUTE)
        A, B = start
        if A.shape[0] != r:
            raise ValueError(f"LoRA-GA: the saved A0 has rank {A.shape[0]}; this layer's rank is {r}")
        return A, B
    gradient = getattr(base, GRADIENT_ATTRIBUTE, None)
    if gradient is None:
        raise ValueError(
            "init='lora_ga' starts from the gradient of the base weight: run "
            "peftcore.lora_ga.estimate_gradients(model, config, train_step) before inject "
            "(or peftcore.lora_ga.use_starting_factors with the factors of an earlier start)"
        )
    delattr(base, GRADIENT_ATTRIBUTE)
    return lora_ga_factors(gradient, read_weight(base), r, lora_scale, *options)


def starting_factors(model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """Every LoRA-GA layer's starting factors by module name, ``{name: {"A": A0, "B": B0}}``, to
    rebuild the same start later with ``use_starting_factors``."""
    return {
        name: {"A": module.initial_A.detach().cpu(), "B": module.initial_B.detach().cpu()}
        for name, module in model.named_modules()
        if getattr(module, "init", None) == "lora_ga" and getattr(module, "initial_A", None) is not None
    }


def use_starting_factors(model: nn.Module, config, factors: dict[str, dict[str, torch.Tensor]]) -> None:
    """Leave on each of ``config``'s targets the factors ``starting_factors`` returned, for
    ``inject`` to start from instead of a gradient. The names must be exactly the targets."""
    modules = dict(model.named_modules())
    targets = select_targets(model, config)
    if sorted(targets) != sorted(factors):
        missing, extra = sorted(set(targets) - set(factors)), sorted(set(factors) - set(targets))
        raise ValueError(
            f"LoRA-GA starting factors do not match the targets: missing for {missing[:5]}, given for "
            f"modules that are not targets {extra[:5]}; were they saved with another target_modules or model?"
        )
    for name in targets:
        weight = modules[name].weight
        out_features, in_features = (weight.shape[::-1]) if is_transposed(modules[name]) else weight.shape
        A, B = factors[name]["A"], factors[name]["B"]
        if A.shape[1] != in_features or B.shape[0] != out_features or A.shape[0] != B.shape[1]:
            raise ValueError(
                f"LoRA-GA starting factors for {name!r} have shapes A {tuple(A.shape)}, B {tuple(B.shape)}; "
                f"the module is ({out_features}, {in_features})"
            )
        setattr(modules[name], START_ATTRIBUTE, (A.to(weight.device), B.to(weight.device)))

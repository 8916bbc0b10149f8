"""LoRA's layer as one autograd node over a dense frozen base: ``FusedLoRA``.

``LoRALinear`` (peftcore/lora.py) calls it when the base is an ``nn.Linear`` or a transformers
``Conv1D`` (its (in, out) weight passed as the (out, in) view ``peftcore.weights.dense_weight``
gives, so the equation below holds unchanged) and every operand has one dtype (or autocast chooses
it), and, while dropout is active, only on the CPU, where the dropped positions are drawn by
``peftcore.kernels.dropout``.
"""

from __future__ import annotations

import torch

from peftcore.kernels.dropout import apply_drop

__all__ = ["FusedLoRA"]


class FusedLoRA(torch.autograd.Function):
    """``y = x W^T + b + s (d(x) A^T) B^T`` as one autograd node, for a dense frozen base.

    ``d`` is LoRA's dropout: the identity, or (``drop`` given) ``x / (1 - p)`` with the elements
    at the flat positions ``drop`` zeroed (see peftcore/kernels/dropout.py). Forward writes the
    update into the base's output (``addmm_``) instead of materialising ``s B A d(x)`` and adding
    it; backward computes only what trains and what flows on:

        dB = s g^T (d(x) A^T),   dA = (s g B)^T d(x),   dx = g W + d'((s g B) A)

    where ``d'`` zeroes the dropped positions and scales by ``1 / (1 - p)``. Autograd's version
    of the same layer writes and reads two more (tokens x features) tensors each way and keeps
    the dropped input and a float mask for backward; here ``d(x)`` is recomputed from ``x``
    (kept anyway: q, k and v share it) and the int64 positions of the ~p n drops.

    Saved for backward: ``x`` (as rows), ``d(x) A^T`` (tokens x r), ``W``, ``A``, ``B`` and
    ``drop`` (None without dropout).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scale: float, drop=None, keep_scale: float = 1.0):
        rows = x.reshape(-1, x.shape[-1])
        adapter_in = rows if drop is None else apply_drop(rows, drop, keep_scale)
        down = adapter_in @ lora_a.t()  # (tokens, r)
        del adapter_in
        out = torch.addmm(bias, rows, weight.t()) if bias is not None else rows @ weight.t()
        out.addmm_(down, lora_b.t(), alpha=scale)
        ctx.save_for_backward(rows, down, weight, lora_a, lora_b, drop)
        ctx.scale, ctx.keep_scale, ctx.x_shape = scale, keep_scale, x.shape
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        rows, down, weight, lora_a, lora_b, drop = ctx.saved_tensors
        grad = grad.reshape(-1, grad.shape[-1])
        grad_down = (grad @ lora_b).mul_(ctx.scale)  # (tokens, r): the gradient reaching d(x) A^T
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            if drop is None:
                grad_x = (grad @ weight).addmm_(grad_down, lora_a)
            else:
                through_adapter = grad_down @ lora_a
                through_adapter.view(-1).index_fill_(0, drop, 0.0)
                grad_x = torch.addmm(through_adapter, grad, weight, beta=ctx.keep_scale)
            grad_x = grad_x.view(ctx.x_shape)
        if ctx.needs_input_grad[3]:
            adapter_in = rows if drop is None else apply_drop(rows, drop, ctx.keep_scale)
            grad_a = grad_down.t() @ adapter_in
        if ctx.needs_input_grad[4]:
            grad_b = (grad.t() @ down).mul_(ctx.scale)
        return grad_x, None, None, grad_a, grad_b, None, None, None

"""LoftQ (Li et al., 2023, "LoftQ: LoRA-Fine-Tuning-Aware Quantization for Large Language Models"):
quantize the base and start LoRA together, so that ``Q + s B A`` starts closer to ``W`` than
QLoRA's ``Q`` alone.

With ``NF4(.)`` 4-bit quantization (blocks of 64, no double quantization: peft's ``loftq_bits=4``)
and ``SVD_r`` the rank-r truncated SVD, T = ``loftq_iter`` alternations:

    R_0 = W
    for t = 1..T:  Q_t = NF4(R_{t-1});   U S V^T = SVD_r(W - deq(Q_t));   R_t = W - U S V^T
    Q = Q_T,   L = U sqrt(S),   R = sqrt(S) V^T,   s B A = L R:   B = L / sqrt(s),  A = R / sqrt(s)

so with T = 1, Q is plain QLoRA's NF4(W) and the adapter starts as the best rank-r fit of what
quantization lost. The SVD is ``torch.linalg.svd`` in float32, as peft's ``loftq_init``. peft puts
``A = R, B = L`` whatever the scale ``s = alpha / r`` (its issue #1982), which starts at ``Q + s L R``:
equal to ours where ``alpha == r``, further from ``W`` elsewhere; peftcore divides by ``s``.

The base becomes an ``NF4Linear`` holding Q (its compute dtype the weight's dtype). LoftQ needs the
full-precision weight, so it is refused over a base that is already 4-bit. A saved LoftQ adapter holds
A and B only, as peft's: loading it re-runs LoftQ on the original weights, as peft does. With T = 1,
Q = NF4(W) is the same everywhere; with T >= 2, Q depends on the SVD's rounding, which may differ
between machines (LAPACK builds, thread counts, CPU vs CUDA) and flip a code. ``fingerprint`` hashes
Q's storage: ``save_adapter`` records it per layer and ``load_adapter`` refuses a re-run whose Q
differs (another base, or rounding on another machine) rather than train on a base the adapter was
not fitted to.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from peftcore.config import NF4Config
from peftcore.nf4 import NF4Linear
from peftcore.nf4_format import NF4State, dequantize_nf4, quantize_nf4
from peftcore.weights import in_features, out_features

__all__ = ["LOFTQ_BLOCKSIZE", "fingerprint", "loftq_factors", "loftq_layer_error", "quantized_base"]

LOFTQ_BLOCKSIZE = 64  # peft quantizes with bitsandbytes' defaults: blocks of 64, no double quantization


def loftq_factors(weight: torch.Tensor, r: int, iters: int) -> tuple[NF4State, torch.Tensor, torch.Tensor]:
    """LoftQ of the (out, in) ``weight``: Q's NF4 state and the float32 factors L (out, r), R (r, in)
    with ``deq(Q) + L R ~= W`` (the module docstring's loop)."""
    if r > min(weight.shape):
        raise ValueError(f"LoftQ: rank {r} exceeds the {tuple(weight.shape)} weight's {min(weight.shape)}")
    W = weight.detach().float()
    remainder = W
    for step in range(iters):
        state = quantize_nf4(remainder, LOFTQ_BLOCKSIZE, double_quant=False)
        U, S, Vh = torch.linalg.svd(W - dequantize_nf4(state, torch.float32), full_matrices=False)
        root = S[:r].sqrt()
        L, R = U[:, :r] * root, root.unsqueeze(1) * Vh[:r]
        if step + 1 < iters:
            remainder = W - L @ R
    return state, L, R


def quantized_base(base: nn.Module, state: NF4State) -> NF4Linear:
    """An NF4Linear holding ``state`` in place of the dense ``base`` (its bias kept)."""
    dtype = base.weight.dtype  # the model's (read_weight gives float32)
    config = NF4Config(blocksize=LOFTQ_BLOCKSIZE, double_quant=False, compute_dtype=dtype)
    layer = NF4Linear(
        in_features(base), out_features(base), base.bias is not None, config, device=state.packed.device
    )
    layer.weight_packed.copy_(state.packed)
    layer.absmax.copy_(state.absmax)
    if base.bias is not None:
        layer.bias = nn.Parameter(base.bias.detach().clone(), requires_grad=False)
    return layer


def fingerprint(layer: NF4Linear) -> str:
    """A short hash of an NF4 layer's stored weight (codes and scales): equal iff Q is."""
    digest = hashlib.sha256()
    for tensor in (layer.weight_packed, layer.absmax):
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def loftq_layer_error(weight: torch.Tensor, r: int, iters: int, lora_scale: float = 1.0) -> dict[str, float]:
    """The relative starting error ``||W - (Q + s B A)||_F / ||W||_F`` of LoftQ next to plain QLoRA's
    ``||W - NF4(W)||_F / ||W||_F`` (same NF4 settings), for reports and tests."""
    W = weight.detach().float()
    norm = W.norm()
    plain = quantize_nf4(W, LOFTQ_BLOCKSIZE, double_quant=False)
    state, L, R = loftq_factors(W, r, iters)
    B, A = L / lora_scale**0.5, R / lora_scale**0.5
    start = dequantize_nf4(state, torch.float32) + lora_scale * (B @ A)
    return {
        "qlora": float((W - dequantize_nf4(plain, torch.float32)).norm() / norm),
        "loftq": float((W - start).norm() / norm),
    }

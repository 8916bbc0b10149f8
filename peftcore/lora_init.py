"""LoRA's inits that start the adapter on the principal part of the base weight: PiSSA and OLoRA.

Each takes the base weight ``W`` (float32, (out, in)) and returns the factors ``(A, B)``,
``A``: (r, in), ``B``: (out, r). ``LoRALinear.initialise`` sets the adapter to them and leaves the
base holding the residual ``W - s B A``, so the layer's output is unchanged at step 0 (up to float
rounding). The other inits (kaiming, gaussian) draw A and set B = 0; they are in the layer.
"""

from __future__ import annotations

import torch

__all__ = ["olora_factors", "pissa_factors"]


def pissa_factors(
    weight: torch.Tensor, r: int, scale: float, niter: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """PiSSA (Meng et al., 2024): the top ``r`` singular triplets of ``W``, split evenly.

        W = U S V^T,   A = sqrt(S_r / s) V_r^T,   B = U_r sqrt(S_r / s),   so  s B A = U_r S_r V_r^T

    ``niter`` None takes the exact SVD (``torch.linalg.svd``); an int takes
    ``torch.svd_lowrank(W, q=r, niter=niter)``, which is randomised (it draws from torch's default
    generator): peft's ``pissa_niter_<N>``.
    """
    if niter is None:
        U, S, Vh = torch.linalg.svd(weight, full_matrices=False)
        U, S, Vh = U[:, :r], S[:r], Vh[:r]
    else:
        U, S, V = torch.svd_lowrank(weight, q=r, niter=niter)
        Vh = V.T
    root = torch.sqrt(S / scale)
    return root[:, None] * Vh, U * root[None, :]  # A, B: s * B @ A == U_r S_r V_r^T


def olora_factors(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """OLoRA (Büyükakyüz, 2024): the first ``r`` columns of an orthonormal basis of ``W``'s columns.

        W = Q R,   A = R[:r],   B = Q[:, :r]

    The factors are not divided by the scale, so the part moved is ``s Q_r R_r`` (as in peft).
    """
    Q, R = torch.linalg.qr(weight)
    return R[:r], Q[:, :r]

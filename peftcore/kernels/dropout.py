"""Dropout on the CPU by drawing only the positions it drops.

torch's dropout draws one random number per element, and on a CPU its generator runs serially:
for LoRA's dropout on a (tokens x features) input that costs as much as the layer's matrix
product (measured on 2 cores: 20 ms for a 4096 x 512 input at p = 0.05, the same as the
512 x 512 base product). In a run of i.i.d. Bernoulli(p) drops, the numbers of kept elements
between consecutive drops are i.i.d. geometric:

    P(G = k) = (1 - p)^k p,      G = floor(ln U / ln(1 - p)),  U ~ Uniform(0, 1]

so the positions ``G_1, G_1 + 1 + G_2, ...`` have exactly the distribution of the dropped
positions of a per-element mask, and cost about ``n p`` random numbers instead of ``n``
(n p + a few standard deviations are drawn at once; more only in the rare case that falls short).
U is drawn in float64 (53 bits; ``torch.rand`` < p in float32 resolves p to 24 bits) from torch's
default generator, so ``torch.manual_seed`` makes the masks reproducible.
"""

from __future__ import annotations

import math

import torch

__all__ = ["dropped_positions", "apply_drop"]


def dropped_positions(numel: int, p: float) -> torch.Tensor:
    """The sorted flat indices (int64, CPU) that a dropout with probability ``p`` drops out of ``numel``."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"dropout probability must be in (0, 1), got {p}")
    if numel == 0:
        return torch.empty(0, dtype=torch.int64)
    log_keep = math.log1p(-p)
    expected = numel * p
    chunk = int(expected + 6.0 * math.sqrt(expected * (1.0 - p)) + 16)
    found, last = [], -1  # last: the position of the latest drop so far
    while last < numel - 1:  # the next drop would be past the end
        uniform = 1.0 - torch.rand(chunk, dtype=torch.float64)  # in (0, 1]
        gaps = torch.floor(torch.log(uniform) / log_keep).to(torch.int64)  # kept elements before each drop
        positions = torch.cumsum(gaps + 1, 0).add_(last)
        found.append(positions)
        last = int(positions[-1])
    positions = torch.cat(found) if len(found) > 1 else found[0]
    return positions[: int(torch.searchsorted(positions, numel))]


def apply_drop(x: torch.Tensor, positions: torch.Tensor, keep_scale: float) -> torch.Tensor:
    """``dropout(x)``: a new tensor, ``x * keep_scale`` with the elements at ``positions`` (flat) zeroed."""
    out = (x * keep_scale).contiguous()  # flat positions count in row-major order
    out.view(-1).index_fill_(0, positions, 0.0)
    return out

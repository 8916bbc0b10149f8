"""Helpers for tests and benchmarks that compare peftcore with peft: random T5 models of the
public shapes (random weights only ever asked for explicitly), token batches, and adapters moved
away from their init, since an adapter that does nothing (B = 0, IA3 vectors = 1) proves nothing."""

from __future__ import annotations

import torch
import transformers
from torch import nn

from peftcore.t5 import t5_config


def random_t5(
    shape: str = "t5-tiny", gated: bool = False, seed: int = 0, device: str | torch.device = "cpu"
) -> transformers.T5ForConditionalGeneration:
    """A T5 of ``shape`` (``t5-tiny`` | ``t5-small`` | ``t5-base``) with seeded random weights, in eval mode."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = transformers.T5ForConditionalGeneration(t5_config(shape, gated=gated))
    return model.eval()


def t5_batch(batch: int = 2, src: int = 7, tgt: int = 5, seed: int = 1) -> dict[str, torch.Tensor]:
    """Random token ids (no padding) and labels of T5's vocabulary, on the CPU."""
    g = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(2, 32128, (batch, src), generator=g),
        "attention_mask": torch.ones(batch, src, dtype=torch.long),
        "labels": torch.randint(2, 32128, (batch, tgt), generator=g),
    }


def move_off_init(model: nn.Module, seed: int, scale: float = 0.05) -> nn.Module:
    """Every trainable tensor moved away from its init by ``scale`` times Gaussian noise (drawn on
    the CPU, so the same on every device), as training would; the model in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_((scale * torch.randn(p.shape, generator=g)).to(p.device, p.dtype))
    return model.eval()

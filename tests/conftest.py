"""Shared fixtures: T5 models of the public shapes with random weights (asked for explicitly)."""

import copy

import pytest
import torch
import transformers

from peftcore.t5 import t5_config


def build_t5(shape: str = "t5-tiny", gated: bool = False, seed: int = 0, device: str = "cpu"):
    torch.manual_seed(seed)
    with torch.device(device):
        model = transformers.T5ForConditionalGeneration(t5_config(shape, gated=gated))
    return model.eval()


def t5_batch(batch: int = 2, src: int = 7, tgt: int = 5, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(2, 32128, (batch, src), generator=g),
        "attention_mask": torch.ones(batch, src, dtype=torch.long),
        "labels": torch.randint(2, 32128, (batch, tgt), generator=g),
    }


def move_off_init(model, seed: int):
    """Every trainable tensor moved away from its init by 5% noise, as training would; eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


@pytest.fixture
def tiny_t5():
    return build_t5("t5-tiny")


@pytest.fixture
def twin_tiny_t5():
    """Two identical tiny T5s: one for peftcore, one for the reference."""
    model = build_t5("t5-tiny")
    return model, copy.deepcopy(model)


def assert_merged_matches_peft(ours, theirs, batch, config):
    """Our merged model computes what peft's unmerged one does. Where no tied layer (lm_head) is
    targeted, peft's merged model agrees too; on a tied lm_head peft's merge also rewrites the
    input embeddings (it warns), ours unties first, so only the unmerged reference is fair."""
    import warnings

    import peftcore

    with torch.no_grad():
        reference = theirs(**batch).logits
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peftcore.merge(ours)
        # merged (W + sBA) x and unmerged W x + s B A x differ by float reassociation only
        torch.testing.assert_close(ours(**batch).logits, reference, atol=1e-4, rtol=1e-4)
        if "lm_head" not in config.target_modules:
            theirs.merge_adapter()
            torch.testing.assert_close(ours(**batch).logits, theirs(**batch).logits, atol=1e-5, rtol=1e-5)
            theirs.unmerge_adapter()

"""Helpers shared by the tests (the model builders and batches are peftcore.testing's, which the
benchmarks use too)."""

import warnings

import torch

import peftcore
from peftcore.testing import move_off_init, t5_batch
from peftcore.testing import random_t5 as build_t5

__all__ = ["assert_merged_matches_peft", "build_t5", "move_off_init", "t5_batch"]


def assert_merged_matches_peft(ours, theirs, batch, config):
    """Our merged model computes what peft's unmerged one does. Where no tied layer (lm_head) is
    targeted, peft's merged model agrees too; on a tied lm_head peft's merge also rewrites the
    input embeddings (it warns), ours unties first, so only the unmerged reference is fair."""
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

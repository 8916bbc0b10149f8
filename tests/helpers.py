"""Helpers shared by the tests (the model builders and batches are peftcore.testing's, which the
benchmarks use too)."""

import warnings
from pathlib import Path

import torch

import peftcore
from peftcore.testing import move_off_init, t5_batch
from peftcore.testing import random_t5 as build_t5

__all__ = ["DEMO", "TINY_FIT", "assert_merged_matches_peft", "build_t5", "move_off_init", "t5_batch"]

DEMO = str(Path(__file__).resolve().parents[1] / "experiments/configs/demo.yaml")
# The demo config cut to a few seconds of fit: 4 dialogues, one epoch, one validation batch.
TINY_FIT = [
    "--data.limit_train=4",
    "--data.limit_val=2",
    "--data.batch_size=4",
    "--data.max_source_length=48",
    "--model.generation.max_new_tokens=4",
    "--trainer.max_epochs=1",
    "--trainer.limit_val_batches=1",
    "--trainer.enable_model_summary=false",
    "--trainer.enable_progress_bar=false",
]


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

"""Parameter counts and footprints in both conventions, on the t5-base shape (built on the meta
device: shapes only): peftcore's logical counts, and the seed study's, which are transformers'
num_parameters() / get_memory_footprint() over bitsandbytes (a 4-bit weight as its stored
elements, no quantization state). The study's three QLoRA figures come out exactly."""

from __future__ import annotations

import pytest
import torch
from helpers import build_t5

from peftcore import IA3Config, LoRAConfig, NF4Config, count_parameters, inject, memory_footprint, quantize

STUDY_TARGETS = ("q", "k", "v", "o", "wi", "wo", "lm_head")


def t5_base(config, nf4: NF4Config | None = None):
    model = build_t5("t5-base", device="meta")
    if nf4 is not None:
        quantize(model, nf4)
    return inject(model, config)


def test_the_study_qlora_column_and_ours_beside_it():
    model = t5_base(
        LoRAConfig(r=16, alpha=32, target_modules=("q", "v")), NF4Config(compute_dtype=torch.bfloat16)
    )
    logical, stored = count_parameters(model), count_parameters(model, stored=True)
    assert (stored.total, stored.trainable) == (153_894_144, 1_769_472)
    assert round(stored.trainable_percent, 6) == 1.149798
    assert round(memory_footprint(model, quantization_state=False) / 2**30, 6) == 0.375546
    # ours: every 4-bit weight as its 141,557,760 logical elements, 70,778,880 more than stored
    assert (logical.total, round(logical.trainable_percent, 4)) == (224_673_024, 0.7876)
    assert logical.total - stored.total == 70_778_880
    assert memory_footprint(model) > memory_footprint(model, quantization_state=False)  # the scales


@pytest.mark.parametrize(
    "config, total, trainable",
    [
        (LoRAConfig(r=32, alpha=64, target_modules=STUDY_TARGETS), 236_932_352, 14_028_800),
        (IA3Config(target_modules=STUDY_TARGETS, feedforward_modules=("wo",)), 223_193_728, 290_176),
    ],
    ids=["lora", "ia3"],
)
def test_without_a_4bit_base_the_two_conventions_agree_with_the_study(config, total, trainable):
    model = t5_base(config)
    for stored in (False, True):
        counts = count_parameters(model, stored=stored)
        assert (counts.total, counts.trainable) == (total, trainable)
    assert memory_footprint(model, quantization_state=False) == memory_footprint(model)

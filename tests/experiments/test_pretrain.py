"""Span corruption as T5 does it, a few steps of pretraining that lower its loss, and the shipped
pretrained base: a real model, not random weights."""

import json

import pytest
import torch
import transformers

from experiments.data import load_tokenizer
from experiments.pretrain import (
    SHIPPED,
    batch_of,
    corrupt,
    dialogue_chunks,
    heldout_loss,
    noise_mask,
    pretrain,
)

pytestmark = pytest.mark.e2e  # whole commands: `pytest -m "not e2e"` skips them


def test_noise_is_15_percent_in_spans_of_mean_3_and_starts_kept():
    g = torch.Generator().manual_seed(0)
    for length in (20, 64, 128, 500):
        mask = noise_mask(length, g)
        spans = sum(1 for i, m in enumerate(mask) if m and (i == 0 or not mask[i - 1]))
        assert len(mask) == length and sum(mask) == round(0.15 * length)
        assert spans == max(round(sum(mask) / 3), 1) and not mask[0]


def test_the_target_holds_exactly_what_the_sentinels_hide():
    tokens, sentinels = list(range(100, 140)), [32099 - k for k in range(100)]
    mask = noise_mask(len(tokens), torch.Generator().manual_seed(3))
    inputs, targets = corrupt(tokens, mask, sentinels, eos=1)
    assert inputs[-1] == 1 and targets[-1] == 1 and targets[0] == sentinels[0]
    # put every hidden span back where its sentinel stands: the chunk again
    spans, current = {}, None
    for token in targets[:-1]:
        if token in sentinels:
            current = token
            spans[current] = []
        else:
            spans[current].append(token)
    restored = [t for token in inputs[:-1] for t in (spans[token] if token in sentinels else [token])]
    assert restored == tokens and spans[targets[-2]] == []  # the closing sentinel hides nothing


def test_a_few_steps_lower_the_loss_and_write_a_model_transformers_loads(tmp_path):
    record = pretrain(
        output_dir=str(tmp_path / "base"),
        steps=40,
        batch_size=8,
        chunk_length=64,
        warmup_steps=5,
        lr=3e-3,
        log_every=20,
    )
    assert record["losses"]["heldout_after"] < record["losses"]["heldout_before"] - 1.0
    model = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "base", dtype=torch.float32)
    assert (
        model.config.d_model == 64
        and json.loads((tmp_path / "base/pretrain.json").read_text())["settings"]["steps"] == 40
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]  # no staging directory left


def test_the_shipped_base_is_pretrained_not_random():
    """Its span-corruption loss on held-out dialogue is far below a random model's (about 10.4)."""
    assert (SHIPPED / "pretrain.json").exists(), f"{SHIPPED} is missing: run python -m experiments pretrain"
    record = json.loads((SHIPPED / "pretrain.json").read_text())
    tokenizer = load_tokenizer("bundled")
    sentinels = [tokenizer.convert_tokens_to_ids(f"<extra_id_{k}>") for k in range(100)]
    chunks = dialogue_chunks(tokenizer, record["settings"]["chunk_length"])[-16:]  # the held-out end
    batch = batch_of(chunks, torch.Generator().manual_seed(7), sentinels, tokenizer.eos_token_id)
    model = transformers.T5ForConditionalGeneration.from_pretrained(SHIPPED, dtype=torch.float32)
    loss = heldout_loss(model, [batch])
    assert loss == pytest.approx(record["losses"]["heldout_after"], abs=0.5) and loss < 5.0

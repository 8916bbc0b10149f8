"""Soft-prompt tuning against peft: the same logits and generated tokens (greedy and beam search),
the text init as peft makes it, and the encoder-only prompt's half of peft's rows."""

import copy
from pathlib import Path

import peft
import pytest
import torch
from helpers import build_t5, t5_batch

import peftcore
from peftcore import PromptTuningConfig
from peftcore.surgery import adapter_layers

TOKENIZER = str(Path(__file__).resolve().parents[2] / "experiments/assets/t5-tokenizer")


def padded_batch():
    batch = t5_batch(batch=3, src=9)
    batch["attention_mask"][1, -3:] = 0
    return batch


def peft_prompt(base, **kwargs):
    config = peft.PromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=6, **kwargs)
    return peft.get_peft_model(copy.deepcopy(base), config)


@pytest.mark.parametrize("beams", [1, 4])
def test_generation_equals_peft_on_the_same_prompt(tmp_path, beams):
    base = build_t5("t5-tiny")
    theirs = peft_prompt(base)
    with torch.no_grad():
        theirs.prompt_encoder["default"].embedding.weight.normal_(
            std=2.0
        )  # far from anything random init gives
    theirs.save_pretrained(tmp_path)
    ours = peftcore.load_adapter(copy.deepcopy(base), tmp_path).eval()
    theirs.eval()
    batch = padded_batch()
    kwargs = dict(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        num_beams=beams,
        max_new_tokens=10,
        do_sample=False,
    )
    with torch.no_grad():
        torch.testing.assert_close(ours(**batch).logits, theirs(**batch).logits, atol=1e-5, rtol=1e-5)
        assert torch.equal(ours.generate(**kwargs), theirs.generate(**kwargs))
        plain = base.eval().generate(**kwargs)
    assert not torch.equal(ours.generate(**kwargs), plain)  # the prompt changes what is generated


def test_text_init_is_the_embeddings_of_the_text_as_peft_makes_them():
    base = build_t5("t5-tiny")
    text = "Summarize the conversation:"
    theirs = peft_prompt(
        base, prompt_tuning_init="TEXT", prompt_tuning_init_text=text, tokenizer_name_or_path=TOKENIZER
    )
    ours = peftcore.inject(copy.deepcopy(base), PromptTuningConfig(6, "text", text, TOKENIZER))
    ((_, prompt),) = adapter_layers(ours)
    torch.testing.assert_close(prompt.embedding, theirs.prompt_encoder["default"].embedding.weight[:6])


def test_vocab_init_takes_rows_of_the_vocabulary_and_only_the_prompt_trains():
    model = peftcore.inject(build_t5("t5-tiny"), PromptTuningConfig(num_virtual_tokens=5, init="vocab"))
    ((_, prompt),) = adapter_layers(model)
    vocabulary = model.get_input_embeddings().weight
    assert all(any(torch.equal(row, v) for v in vocabulary) for row in prompt.embedding)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["peftcore_prompt.embedding"]


def test_half_of_peft_rows_are_never_used(tmp_path):
    """What peft keeps for the decoder does not change its outputs: any values give the same logits."""
    base = build_t5("t5-tiny")
    theirs = peft_prompt(base).eval()
    weight = theirs.prompt_encoder["default"].embedding.weight
    assert weight.shape[0] == 12
    batch = padded_batch()
    with torch.no_grad():
        before = theirs(**batch).logits
        weight[6:].normal_(std=5.0)
        torch.testing.assert_close(theirs(**batch).logits, before, atol=0, rtol=0)


def test_a_prompt_file_for_another_width_or_task_is_refused(tmp_path):
    import json

    peft_prompt(build_t5("t5-tiny")).save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**data, "token_dim": 512}))
    with pytest.raises(ValueError, match="token_dim=512; the model's d_model is 64"):
        peftcore.load_adapter(build_t5("t5-tiny"), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({**data, "num_virtual_tokens": 4}))
    with pytest.raises(
        ValueError,
        match=r"prompt_embeddings has 12 rows; num_virtual_tokens=4 x num_transformer_submodules=2",
    ):
        peftcore.load_adapter(build_t5("t5-tiny"), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({**data, "task_type": "CAUSAL_LM"}))
    with pytest.raises(ValueError, match="task_type='CAUSAL_LM'"):
        peftcore.load_adapter(build_t5("t5-tiny"), tmp_path)

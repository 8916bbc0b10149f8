"""Prefix tuning: logits and gradients equal to peft's (with and without the MLP, an odd and an
even number of layers, decoder padding), generate and beam search carrying the prefix through
every step, peft's layout quirks stated in the module docstring checked, files both ways, and
models it does not fit refused by name."""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch
import transformers
from helpers import build_t5, move_off_init, t5_batch

import peftcore
from peftcore import PrefixTuningConfig, disable_adapters, inject, load_adapter, save_adapter

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def t5(layers: int = 2, decoder_layers: int | None = None):
    config = transformers.T5Config(
        d_model=64, d_ff=128, num_layers=layers, num_decoder_layers=decoder_layers or layers, num_heads=4, d_kv=16,
        vocab_size=32128, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, dropout_rate=0.0,
    )  # fmt: skip
    torch.manual_seed(layers)
    return transformers.T5ForConditionalGeneration(config).eval()


def both(base, config: PrefixTuningConfig, seed: int = 1):
    """Ours moved off its init, and peft's holding the same tensors."""
    ours = move_off_init(inject(copy.deepcopy(base), config), seed)
    theirs = peft.get_peft_model(
        copy.deepcopy(base),
        peft.PrefixTuningConfig(
            task_type="SEQ_2_SEQ_LM",
            num_virtual_tokens=config.num_virtual_tokens,
            prefix_projection=config.prefix_projection,
            encoder_hidden_size=config.encoder_hidden_size,
        ),
    )
    encoder = theirs.prompt_encoder["default"]
    with torch.no_grad():
        encoder.embedding.weight.copy_(ours.peftcore_prefix.embedding)
        if config.prefix_projection:
            for name, param in encoder.transform.named_parameters():
                param.copy_(ours.peftcore_prefix.transform.get_parameter(name))
    return ours, theirs.eval()


def padded_batch():
    batch = t5_batch(seed=3)
    batch["attention_mask"][1, -3:] = 0
    labels = batch["labels"]
    batch["decoder_input_ids"] = torch.cat([torch.zeros_like(labels[:, :1]), labels[:, :-1]], dim=1)
    batch["decoder_attention_mask"] = torch.ones_like(batch["decoder_input_ids"])
    batch["decoder_attention_mask"][0, -2:] = 0
    return batch


@pytest.mark.parametrize("layers", [2, 3])
@pytest.mark.parametrize("projection", [False, True])
def test_logits_and_gradients_equal_peft(layers, projection):
    ours, theirs = both(t5(layers), PrefixTuningConfig(num_virtual_tokens=5, prefix_projection=projection))
    for batch in (t5_batch(), padded_batch()):
        with torch.no_grad():
            torch.testing.assert_close(ours(**batch).logits, theirs(**batch).logits, atol=1e-5, rtol=1e-5)
    batch = padded_batch()
    ours(**batch).loss.backward()
    theirs(**batch).loss.backward()
    their_encoder = theirs.prompt_encoder["default"]
    torch.testing.assert_close(ours.peftcore_prefix.embedding.grad, their_encoder.embedding.weight.grad)
    if projection:
        for name, param in their_encoder.transform.named_parameters():
            torch.testing.assert_close(ours.peftcore_prefix.transform.get_parameter(name).grad, param.grad)


def test_an_even_number_of_layers_leaves_half_the_table_untrained_as_in_peft():
    """The module docstring's claim: with L = 2, chunks 2 and 3 (of 4) are never read."""
    model = move_off_init(inject(t5(2), PrefixTuningConfig(num_virtual_tokens=5)), 1)
    model(**t5_batch()).loss.backward()
    grad = model.peftcore_prefix.embedding.grad.view(5, 4, 64)
    assert grad[:, :2].abs().sum() > 0 and torch.equal(grad[:, 2:], torch.zeros_like(grad[:, 2:]))


def greedy_by_forward(model, batch, steps: int) -> torch.Tensor:
    """Greedy decoding recomputed from scratch at every step (a fresh prefix each forward)."""
    tokens = torch.zeros(batch["input_ids"].shape[0], 1, dtype=torch.long)
    done = torch.zeros(tokens.shape[0], dtype=torch.bool)
    for _ in range(steps):
        with torch.no_grad():
            logits = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], decoder_input_ids=tokens
            ).logits[:, -1]
        step = torch.where(done, 0, logits.argmax(-1))
        tokens = torch.cat([tokens, step[:, None]], dim=1)
        done |= step == 1
        if done.all():
            break
    return tokens


def test_generate_carries_the_prefix_through_every_step():
    base = t5(3)
    ours, theirs = both(base, PrefixTuningConfig(num_virtual_tokens=5))
    batch = padded_batch()
    generated = ours.generate(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        max_new_tokens=8,
        do_sample=False,
    )
    expected = greedy_by_forward(ours, batch, 8)
    assert torch.equal(generated, expected[:, : generated.shape[1]])
    assert torch.equal(expected, greedy_by_forward(theirs, batch, 8))  # peft's forward picks the same tokens
    assert not torch.equal(generated, greedy_by_forward(base, batch, 8)[:, : generated.shape[1]])
    with disable_adapters(ours):
        assert torch.equal(
            ours.generate(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=8
            ),
            base.generate(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=8
            ),
        )


def test_beam_search_scores_are_the_prefixed_models_log_probabilities():
    ours = move_off_init(inject(t5(3), PrefixTuningConfig(num_virtual_tokens=5)), 1)
    batch = padded_batch()
    out = ours.generate(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], num_beams=3, max_new_tokens=6,
        min_new_tokens=6, length_penalty=0.0, return_dict_in_generate=True, output_scores=True,
    )  # fmt: skip
    with torch.no_grad():
        logits = ours(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            decoder_input_ids=out.sequences[:, :-1],
        ).logits
    chosen = logits.log_softmax(-1).gather(-1, out.sequences[:, 1:, None]).squeeze(-1)
    # min_new_tokens keeps EOS out, so every step is a free choice the scores add up.
    assert not (out.sequences[:, 1:] == 1).any()
    torch.testing.assert_close(out.sequences_scores, chosen.sum(-1), atol=1e-4, rtol=1e-4)


def test_peft_generate_drops_its_prefix_under_transformers_5():
    """What the docstring says of peft 0.21 with transformers 5: its generate gives the base's tokens.
    (If this fails, peft fixed it: compare generate with peft again and update the docstring.)"""
    base = t5(3)
    _, theirs = both(base, PrefixTuningConfig(num_virtual_tokens=5))
    batch = padded_batch()
    kwargs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.equal(theirs.generate(**kwargs), base.generate(**kwargs))


def test_a_projected_prefix_is_saved_as_its_table_and_loads_both_ways(tmp_path):
    base = t5(2)
    ours, theirs = both(
        base, PrefixTuningConfig(num_virtual_tokens=5, prefix_projection=True, encoder_hidden_size=32)
    )
    save_adapter(ours, tmp_path / "ours")
    tensors = peftcore.checkpoint.read_adapter_tensors(tmp_path / "ours")
    assert tensors.keys() == {"prompt_embeddings"} and tensors["prompt_embeddings"].shape == (5, 2 * 2 * 64)
    batch = padded_batch()
    with torch.no_grad():
        expected = ours(**batch).logits
        in_peft = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
        torch.testing.assert_close(in_peft(**batch).logits, expected, atol=1e-5, rtol=1e-5)
        theirs.save_pretrained(tmp_path / "theirs")
        here = load_adapter(copy.deepcopy(base), tmp_path / "theirs")
        assert here.peftcore_config == PrefixTuningConfig(num_virtual_tokens=5)  # the table, no MLP
        torch.testing.assert_close(here(**batch).logits, theirs(**batch).logits, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="learned through an MLP"):
        load_adapter(ours, tmp_path / "theirs")


def test_models_the_layout_does_not_fit_are_refused_by_name():
    with pytest.raises(ValueError, match="decoder has 3 layers, the encoder 2"):
        inject(t5(2, decoder_layers=3), PrefixTuningConfig(num_virtual_tokens=5))
    bart = transformers.BartForConditionalGeneration(
        transformers.BartConfig(d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                                decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, vocab_size=64)
    )  # fmt: skip
    with pytest.raises(ValueError, match="'bart'.*is not one"):
        inject(bart, PrefixTuningConfig(num_virtual_tokens=5))
    with pytest.raises(ValueError, match="encoder_hidden_size"):
        PrefixTuningConfig(encoder_hidden_size=32)


def test_the_t5_base_shape_counts_what_peft_counts():
    for projection, expected in ((False, 368_640), (True, 14_780_160)):
        model = build_t5("t5-base", device="meta")
        inject(model, PrefixTuningConfig(num_virtual_tokens=20, prefix_projection=projection))
        assert peftcore.count_parameters(model).trainable == expected


def test_generate_without_a_cache_and_training_with_checkpointing():
    ours = move_off_init(inject(t5(3), PrefixTuningConfig(num_virtual_tokens=5)), 1)
    batch = padded_batch()
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "max_new_tokens": 8}
    assert torch.equal(ours.generate(**inputs, use_cache=False), ours.generate(**inputs))
    ours.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ours.train()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        ours(**batch)

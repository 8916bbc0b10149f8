"""peftcore/families.py: what depends on the model family follows the model in hand."""

import pytest
import transformers
from torch import nn

import peftcore
from peftcore import families, peft_format
from peftcore.nf4 import NF4Linear
from peftcore.testing import random_t5


def tiny_bart() -> transformers.BartForConditionalGeneration:
    config = transformers.BartConfig(
        vocab_size=128,
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        max_position_embeddings=32,
    )
    return transformers.BartForConditionalGeneration(config)


def tiny_pegasus() -> transformers.PegasusForConditionalGeneration:
    config = transformers.PegasusConfig(
        vocab_size=128,
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        max_position_embeddings=32,
    )
    return transformers.PegasusForConditionalGeneration(config)


def test_quantize_keeps_the_familys_full_precision_modules():
    """T5 keeps wo and lm_head in full precision (as transformers does in 4 bit); BART only lm_head:
    its fc2 is quantized, and no module is skipped for a name only T5 has."""
    bart = peftcore.quantize(tiny_bart(), peftcore.NF4Config())
    kept = sorted(n for n, m in bart.named_modules() if type(m) is nn.Linear)
    assert kept == ["lm_head"]
    assert isinstance(bart.get_submodule("model.encoder.layers.0.fc2"), NF4Linear)
    t5 = peftcore.quantize(random_t5(), peftcore.NF4Config())
    kept = {n.rpartition(".")[2] for n, m in t5.named_modules() if type(m) is nn.Linear}
    assert kept == {"wo", "lm_head"}


@pytest.mark.parametrize(
    "method, peft_type, expected",
    [
        ("lora", "LORA", ("q_proj", "v_proj")),
        ("ia3", "IA3", ("q_proj", "v_proj", "fc2")),
    ],
)
def test_a_peft_file_naming_no_targets_takes_peft_default_for_the_family(method, peft_type, expected):
    data = {"peft_type": peft_type, "target_modules": None, "task_type": "SEQ_2_SEQ_LM"}
    config = peft_format.config_from_peft(data, tiny_bart())
    assert config.target_modules == expected
    assert families.of(random_t5()).lora_targets == ("q", "v")


def test_a_peft_file_naming_no_targets_is_refused_for_a_family_peft_has_no_default_for():
    data = {"peft_type": "LORA", "target_modules": None, "task_type": "SEQ_2_SEQ_LM"}
    with pytest.raises(ValueError, match=r"peft has no default for model type 'pegasus': add target_modules"):
        peft_format.config_from_peft(data, tiny_pegasus())

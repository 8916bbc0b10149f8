"""Configs refuse bad values on construction, naming the field, the value and what is allowed."""

import pytest
import torch

from peftcore import IA3Config, LoRAConfig, NF4Config, PromptTuningConfig


def test_the_documented_message():
    with pytest.raises(ValueError) as info:
        LoRAConfig(r=0)
    assert str(info.value) == "LoRAConfig.r must be a positive integer, got 0"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(r=-2), "LoRAConfig.r must be a positive integer, got -2"),
        (dict(r=2.5), "LoRAConfig.r must be a positive integer"),
        (dict(alpha=0), "LoRAConfig.alpha must be a positive number, got 0"),
        (dict(alpha=-1.5), "LoRAConfig.alpha must be a positive number"),
        (dict(dropout=1.0), r"LoRAConfig.dropout must be a number in \[0, 1\), got 1.0"),
        (dict(dropout=-0.1), "LoRAConfig.dropout"),
        (dict(init="xavier"), "LoRAConfig.init must be one of kaiming | gaussian | pissa"),
        (dict(init="pissa_niter_x"), "LoRAConfig.init"),
        (dict(target_modules=()), "LoRAConfig.target_modules must be a non-empty list"),
        (dict(target_modules="q(("), "LoRAConfig.target_modules must be a valid regular expression"),
        (dict(modules_to_save="lm_head"), "LoRAConfig.modules_to_save must be a list"),
        (dict(rank_pattern={"q": 0}), r"LoRAConfig.rank_pattern\['q'\] must be a positive integer, got 0"),
        (dict(rank_pattern=["q"]), "LoRAConfig.rank_pattern must be a mapping"),
        (
            dict(alpha_pattern={"v((": 2}),
            "LoRAConfig.alpha_pattern must be a mapping whose keys are valid regular",
        ),
        (dict(layers_to_transform=[-1]), "LoRAConfig.layers_to_transform must be a layer index or a list"),
        (
            dict(layers_pattern="block"),
            "LoRAConfig.layers_pattern must be None unless layers_to_transform is set",
        ),
        (
            dict(target_modules=r".*\.q", layers_to_transform=0),
            "LoRAConfig.layers_to_transform must be None when target",
        ),
        (dict(exclude_modules="(("), "LoRAConfig.exclude_modules must be a valid regular expression"),
    ],
)
def test_lora_config_rejects(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoRAConfig(**kwargs)


def test_valid_values_are_normalised():
    config = LoRAConfig(r=4, alpha=8, target_modules=["q", "v"], init="pissa_niter_4", use_rslora=True)
    assert config.target_modules == ("q", "v") and config.scale == 4.0
    config = LoRAConfig(
        layers_to_transform=3, layers_pattern="block", exclude_modules=[], modules_to_save=None
    )
    assert config.layers_to_transform == (3,) and config.layers_pattern == ("block",)
    assert config.exclude_modules is None and config.modules_to_save == ()
    assert (
        LoRAConfig(layers_to_transform=[]).layers_to_transform is None
    )  # peft: an empty list filters nothing
    assert LoRAConfig(r=4, alpha=8).scale == 2.0
    assert NF4Config(compute_dtype="bfloat16").compute_dtype is torch.bfloat16


def test_ia3_feedforward_must_be_a_target():
    with pytest.raises(
        ValueError, match=r"IA3Config.feedforward_modules must be a subset of .*\['wi'\] are not targets"
    ):
        IA3Config(target_modules=("k", "v", "wo"), feedforward_modules=("wo", "wi"))


@pytest.mark.parametrize("blocksize", [0, 16, 48, 100, 8192, True])
def test_nf4_blocksize_must_be_a_power_of_two_in_range(blocksize):
    with pytest.raises(ValueError, match="NF4Config.blocksize must be a power of two in \\[32, 4096\\]"):
        NF4Config(blocksize=blocksize)


def test_nf4_compute_dtype_and_prompt_config():
    with pytest.raises(ValueError, match="NF4Config.compute_dtype"):
        NF4Config(compute_dtype=torch.int8)
    with pytest.raises(ValueError, match="NF4Config.compute_dtype"):
        NF4Config(compute_dtype="float99")
    with pytest.raises(ValueError, match="PromptTuningConfig.init_text"):
        PromptTuningConfig(init="text")
    with pytest.raises(ValueError, match="PromptTuningConfig.num_virtual_tokens"):
        PromptTuningConfig(num_virtual_tokens=0)


@pytest.mark.parametrize("init", ["random", "vocab"])
def test_a_prompt_tokenizer_the_init_would_not_use_is_refused(init):
    with pytest.raises(
        ValueError,
        match=r"PromptTuningConfig\.tokenizer must be a tokenizer name or path exactly when "
        r"init='text', got 't5-base'",
    ):
        PromptTuningConfig(init=init, tokenizer="t5-base")
    assert PromptTuningConfig(init="text", init_text="Summarize", tokenizer="t5-base").tokenizer == "t5-base"

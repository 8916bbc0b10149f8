"""inject / merge / unload on real T5 shapes: parameter counts equal peft's, bad input is refused
without touching the model."""

import copy

import peft
import pytest
import torch
import transformers
from helpers import build_t5, t5_batch

import peftcore
from peftcore import IA3Config, LoRAConfig, count_parameters, inject, memory_footprint, merge, unload
from peftcore.surgery import adapter_layers
from peftcore.t5 import t5_config

ALL_LINEAR = ("q", "k", "v", "o", "wi", "wo", "lm_head")


def peft_config_of(config):
    if isinstance(config, LoRAConfig):
        return peft.LoraConfig(
            r=config.r,
            lora_alpha=config.alpha,
            target_modules=list(config.target_modules),
            task_type="SEQ_2_SEQ_LM",
        )
    return peft.IA3Config(
        target_modules=list(config.target_modules),
        feedforward_modules=list(config.feedforward_modules),
        task_type="SEQ_2_SEQ_LM",
    )


@pytest.mark.parametrize(
    "shape, config",
    [
        ("t5-small", LoRAConfig(r=8, alpha=16, target_modules=("q", "v"))),
        ("t5-base", LoRAConfig(r=8, alpha=16, target_modules=("q", "v"))),
        ("t5-base", LoRAConfig(r=32, alpha=64, target_modules=ALL_LINEAR)),
        ("t5-base", IA3Config()),
        ("t5-base", IA3Config(target_modules=ALL_LINEAR, feedforward_modules=("wo",))),
    ],
    ids=["small-lora-qv", "base-lora-qv", "base-lora-r32-all", "base-ia3-default", "base-ia3-all"],
)
def test_parameter_counts_equal_peft(shape, config):
    # Counting needs shapes only: meta-device models build in milliseconds.
    ours = build_t5(shape, device="meta")
    theirs = peft.get_peft_model(copy.deepcopy(ours), peft_config_of(config))
    inject(ours, config)
    trainable, total = theirs.get_nb_trainable_parameters()
    counted = count_parameters(ours)
    assert (counted.trainable, counted.total) == (trainable, total)
    if shape == "t5-base" and config == LoRAConfig(r=8, alpha=16, target_modules=("q", "v")):
        assert counted.trainable == 884_736  # the figure the study reports


def test_t5_base_shape_and_report_line():
    model = build_t5("t5-base", device="meta")
    assert count_parameters(model).total == 222_903_552
    inject(model, LoRAConfig(r=8, alpha=16))
    line = str(count_parameters(model))
    assert line == "trainable params: 884,736 || all params: 223,788,288 || trainable%: 0.3953"


def test_memory_footprint_counts_bytes_as_stored():
    model = build_t5("t5-tiny")
    expected = sum(p.numel() * 4 for p in model.parameters())
    assert memory_footprint(model) == expected == model.get_memory_footprint()
    model.half()
    assert memory_footprint(model) == expected // 2


def test_only_adapter_and_modules_to_save_train(tiny_t5):
    inject(
        tiny_t5, LoRAConfig(r=4, alpha=8, target_modules=("q", "v"), modules_to_save=("final_layer_norm",))
    )
    trainable = [n for n, p in tiny_t5.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or n.endswith("final_layer_norm.trained.weight") for n in trainable)
    assert (
        sum("final_layer_norm" in n for n in trainable) == 2
    )  # encoder's and decoder's, each a trained copy


def test_regex_targets_match_whole_name(tiny_t5):
    inject(tiny_t5, LoRAConfig(target_modules=r"encoder\.block\.\d+\.layer\.0\.SelfAttention\.(q|v)"))
    names = [n for n, _ in adapter_layers(tiny_t5)]
    assert names and all(n.startswith("encoder.") for n in names) and len(names) == 2 * 2


def test_gated_t5_targets_both_input_projections():
    model = build_t5("t5-tiny", gated=True)
    inject(model, LoRAConfig(target_modules=("wi_0", "wi_1", "wo")))
    assert len(list(adapter_layers(model))) == 3 * (2 + 2)


ALL_BUT_TIED_HEAD = ALL_LINEAR[:-1]


@pytest.mark.parametrize(
    "config",
    [LoRAConfig(r=4, alpha=8, target_modules=ALL_BUT_TIED_HEAD), IA3Config(target_modules=ALL_BUT_TIED_HEAD)],
)
def test_merge_unload_loads_into_a_fresh_model_with_identical_logits(tiny_t5, config):
    inject(tiny_t5, config)
    with torch.no_grad():
        for _, layer in adapter_layers(tiny_t5):
            for p in layer.adapter_params().values():
                p.add_(torch.randn_like(p) * 0.05)
    batch = t5_batch()
    with torch.no_grad():
        adapted = tiny_t5(**batch).logits
    plain = unload(tiny_t5, merge=True)
    assert not list(adapter_layers(plain)) and not hasattr(plain, "peftcore_config")
    fresh = transformers.T5ForConditionalGeneration(t5_config("t5-tiny")).eval()
    fresh.load_state_dict(plain.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(**batch).logits, adapted, atol=1e-5, rtol=1e-5)


def test_unload_without_merge_gives_back_the_base(tiny_t5):
    reference = copy.deepcopy(tiny_t5)
    inject(tiny_t5, LoRAConfig(target_modules=("q", "v")))
    merge(tiny_t5)
    unload(tiny_t5, merge=False)
    for (n, p), (_, q) in zip(tiny_t5.state_dict().items(), reference.state_dict().items()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=n)


# --- bad input: a clear error and the model untouched ------------------------------------------


def state_of(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [
        p.requires_grad for p in model.parameters()
    ]


@pytest.mark.parametrize(
    "config, message",
    [
        (LoRAConfig(target_modules=("q", "vv")), r"'vv' matches no module.*Closest match: 'v'"),
        (LoRAConfig(target_modules=r"decoder\.nothing"), "matches no module"),
        (LoRAConfig(target_modules=("SelfAttention",)), "must select linear layers"),
        (
            LoRAConfig(target_modules=("q",), modules_to_save=("lm_haed",)),
            r"modules_to_save 'lm_haed'.*'lm_head'",
        ),
        (
            IA3Config(target_modules=r".*\.(k|v)", feedforward_modules=("wo",)),
            "feedforward_modules must be targets",
        ),
    ],
)
def test_bad_targets_raise_and_leave_the_model_alone(tiny_t5, config, message):
    before, grads = state_of(tiny_t5)
    with pytest.raises(ValueError, match=message):
        inject(tiny_t5, config)
    after, grads_after = state_of(tiny_t5)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert grads == grads_after and not list(adapter_layers(tiny_t5))


def test_unknown_target_lists_existing_names(tiny_t5):
    with pytest.raises(ValueError) as info:
        inject(tiny_t5, LoRAConfig(target_modules=("query",)))
    assert "'q'" in str(info.value) and "'lm_head'" in str(info.value)


def test_injecting_twice_is_refused(tiny_t5):
    inject(tiny_t5, LoRAConfig())
    with pytest.raises(ValueError, match="already has an adapter"):
        inject(tiny_t5, IA3Config())


def test_inject_rejects_other_configs(tiny_t5):
    with pytest.raises(TypeError, match=r"expected a method config \(LoRAConfig, .*IA3Config.*\), got dict"):
        inject(tiny_t5, {"r": 8})


def test_merging_into_the_tied_lm_head_leaves_the_embeddings_alone(tiny_t5):
    assert tiny_t5.lm_head.weight is tiny_t5.shared.weight  # transformers ties them
    embeddings = tiny_t5.shared.weight.detach().clone()
    inject(tiny_t5, LoRAConfig(r=4, alpha=8, target_modules=("q", "lm_head")))
    with torch.no_grad():
        for _, layer in adapter_layers(tiny_t5):
            layer.lora_B.weight.normal_(std=0.1)
    batch = t5_batch()
    with torch.no_grad():
        adapted = tiny_t5(**batch).logits
        with pytest.warns(UserWarning, match="lm_head shares its weight"):
            merge(tiny_t5)
        torch.testing.assert_close(tiny_t5(**batch).logits, adapted, atol=1e-5, rtol=1e-5)
    assert torch.equal(tiny_t5.shared.weight, embeddings)


# --- modules_to_save: trained copies, as peft makes them ---------------------------------------


def test_a_trained_copy_of_the_tied_lm_head_leaves_the_embeddings_alone(tiny_t5):
    embeddings = tiny_t5.shared.weight.detach().clone()
    inject(tiny_t5, LoRAConfig(r=4, alpha=8, target_modules=("q",), modules_to_save=("lm_head",)))
    with torch.no_grad():
        tiny_t5.lm_head.trained.weight.mul_(2.0)
    assert torch.equal(tiny_t5.shared.weight, embeddings) and torch.equal(
        tiny_t5.encoder.embed_tokens.weight, embeddings
    )
    batch = t5_batch()
    with torch.no_grad():
        adapted = tiny_t5(**batch).logits
        with peftcore.disable_adapters(tiny_t5):  # the original runs again
            assert not torch.allclose(tiny_t5(**batch).logits, adapted)
    merged = unload(copy.deepcopy(tiny_t5), merge=True)
    assert isinstance(merged.lm_head, torch.nn.Linear) and merged.lm_head.weight is not merged.shared.weight
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, adapted)
    plain = unload(tiny_t5, merge=False)
    assert plain.lm_head.weight is plain.shared.weight and torch.equal(plain.shared.weight, embeddings)


@pytest.mark.parametrize(
    "config, message",
    [
        (LoRAConfig(modules_to_save=("shared",)), r"'shared'.*never used in forward.*'embed_tokens'"),
        (
            LoRAConfig(modules_to_save=("block.0", "layer_norm")),
            r"selects both 'encoder\.block\.0' and .*inside it",
        ),
        (LoRAConfig(target_modules=("q", "wo"), modules_to_save=("o",)), r"'o'.*selects .*wo.*adapts"),
        (IA3Config(target_modules=("k", "v"), feedforward_modules=()), None),
    ],
)
def test_ill_defined_copies_are_refused(tiny_t5, config, message):
    if message is None:  # a sanity case: a valid config injects
        inject(tiny_t5, config)
        return
    with pytest.raises(ValueError, match=message):
        inject(tiny_t5, config)
    assert not list(adapter_layers(tiny_t5))


def test_rank_and_alpha_patterns_set_each_layers_rank_and_scale(tiny_t5):
    config = LoRAConfig(
        r=4, alpha=8, target_modules=("q", "v"), rank_pattern={r"decoder\..*\.q": 2}, alpha_pattern={"v": 2}
    )
    inject(tiny_t5, config)
    layers = dict(adapter_layers(tiny_t5))
    assert layers["decoder.block.0.layer.0.SelfAttention.q"].r == 2
    assert layers["decoder.block.0.layer.0.SelfAttention.q"].scale == 8 / 2
    assert layers["encoder.block.0.layer.0.SelfAttention.q"].r == 4
    assert layers["encoder.block.1.layer.0.SelfAttention.v"].scale == 2 / 4


def test_a_pattern_that_matches_no_target_warns(tiny_t5):
    with pytest.warns(UserWarning, match=r"rank_pattern keys \['wo'\] match none of the 12 adapted modules"):
        inject(tiny_t5, LoRAConfig(target_modules=("q", "v"), rank_pattern={"wo": 2, "q": 2}))


def test_layers_and_exclusions_select_as_peft_does(tiny_t5):
    inject(
        tiny_t5,
        LoRAConfig(
            target_modules=("q", "v", "wi"),
            layers_to_transform=(1,),
            layers_pattern="block",
            exclude_modules=r"decoder\..*\.EncDecAttention\..*",
        ),
    )
    names = sorted(n for n, _ in adapter_layers(tiny_t5))
    assert names and all(".block.1." in n and "EncDecAttention" not in n for n in names)
    assert len(names) == 3 + 3  # q, v, wi in each stack's block 1


def test_a_layer_filter_that_leaves_nothing_names_itself(tiny_t5):
    with pytest.raises(
        ValueError, match=r"adapts no module.*layers_to_transform=\[7\] leaves out its layer 0"
    ):
        inject(tiny_t5, LoRAConfig(layers_to_transform=(7,)))

"""Adapters on disk: peft reads what we write, we read what peft writes, bad files are refused."""

import copy
import json
import re

import peft
import pytest
import safetensors.torch
import torch
import transformers
from helpers import build_t5, move_off_init, t5_batch

import peftcore
from peftcore import IA3Config, LoRAConfig, inject, load_adapter, save_adapter
from peftcore.checkpoint import CONFIG_NAME, PICKLED_WEIGHTS_NAME, WEIGHTS_NAME, ModelShapeMismatch
from peftcore.surgery import adapter_layers
from peftcore.t5 import t5_config

CONFIGS = [
    LoRAConfig(r=4, alpha=8, target_modules=("q", "v")),
    LoRAConfig(
        r=4,
        alpha=16,
        target_modules=("q", "k", "v", "o", "wi", "wo"),
        use_rslora=True,
        modules_to_save=("final_layer_norm",),
    ),
    IA3Config(),
    IA3Config(target_modules=("q", "k", "v", "o", "wi", "wo", "lm_head"), feedforward_modules=("wo",)),
]
IDS = ["lora-qv", "lora-rslora-all-modules-to-save", "ia3-default", "ia3-all"]


def trained(model, config, seed=11):
    """Inject and move every trainable tensor away from its init, as training would."""
    return move_off_init(inject(model, config), seed)


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_peft_loads_what_we_save(tmp_path, config):
    base = build_t5("t5-tiny")
    ours = trained(copy.deepcopy(base), config)
    save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(base, tmp_path).eval()
    batch = t5_batch()
    torch.testing.assert_close(logits(theirs, batch), logits(ours, batch), atol=1e-5, rtol=1e-5)
    saved = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert saved["task_type"] == "SEQ_2_SEQ_LM" and saved["peft_type"] in ("LORA", "IA3")


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_we_load_what_peft_saves(tmp_path, config):
    base = build_t5("t5-tiny")
    reference = build_t5("t5-tiny")
    if isinstance(config, LoRAConfig):
        peft_config = peft.LoraConfig(
            r=config.r,
            lora_alpha=config.alpha,
            target_modules=list(config.target_modules),
            use_rslora=config.use_rslora,
            modules_to_save=list(config.modules_to_save) or None,
            init_lora_weights=False,
            task_type="SEQ_2_SEQ_LM",
        )
    else:
        peft_config = peft.IA3Config(
            target_modules=list(config.target_modules),
            feedforward_modules=list(config.feedforward_modules),
            task_type="SEQ_2_SEQ_LM",
        )
    theirs = peft.get_peft_model(reference, peft_config)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in theirs.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    theirs.save_pretrained(tmp_path)
    ours = load_adapter(base, tmp_path).eval()
    batch = t5_batch()
    torch.testing.assert_close(logits(ours, batch), logits(theirs.eval(), batch), atol=1e-5, rtol=1e-5)
    assert isinstance(ours.peftcore_config, type(config))


def test_save_load_round_trip_and_files(tmp_path):
    ours = trained(build_t5("t5-tiny"), CONFIGS[0])
    save_adapter(ours, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]  # no temp files left
    keys = safetensors.torch.load_file(tmp_path / WEIGHTS_NAME).keys()
    assert "base_model.model.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight" in keys
    fresh = load_adapter(build_t5("t5-tiny"), tmp_path).eval()
    batch = t5_batch()
    torch.testing.assert_close(logits(fresh, batch), logits(ours, batch))
    load_adapter(fresh, tmp_path)  # into a model that already holds the same kind of adapter


def test_a_failed_save_keeps_the_previous_adapter(tmp_path, monkeypatch):
    model = trained(build_t5("t5-tiny"), CONFIGS[0])
    save_adapter(model, tmp_path)
    before = (tmp_path / WEIGHTS_NAME).read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(peftcore.checkpoint, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(trained(build_t5("t5-tiny"), CONFIGS[0], seed=99), tmp_path)
    assert (tmp_path / WEIGHTS_NAME).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]


def test_a_save_killed_between_its_two_files_is_refused_not_loaded(tmp_path):
    """The weights of one save beside the config of another (alpha changed, so every shape
    fits): loaded, it would scale the update by the wrong factor without a word."""
    model = trained(build_t5("t5-tiny"), LoRAConfig(r=4, alpha=8, target_modules=("q", "v")))
    save_adapter(model, tmp_path / "old")
    retrained = trained(build_t5("t5-tiny"), LoRAConfig(r=4, alpha=32, target_modules=("q", "v")), seed=5)
    save_adapter(retrained, tmp_path / "new")
    (tmp_path / "old" / CONFIG_NAME).write_bytes(
        (tmp_path / "new" / CONFIG_NAME).read_bytes()
    )  # the kill came here
    with pytest.raises(
        ValueError,
        match=r"come from different saves \(lora_alpha: 32 in adapter_config\.json, "
        r"8 when the weights were saved\): a save_adapter that was interrupted",
    ):
        load_adapter(build_t5("t5-tiny"), tmp_path / "old")
    # the fields that describe the file, not the tensors, may change (by hand too)
    data = json.loads((tmp_path / "new" / CONFIG_NAME).read_text())
    data.update(base_model_name_or_path="somewhere/else", inference_mode=False)
    (tmp_path / "new" / CONFIG_NAME).write_text(json.dumps(data))
    batch = t5_batch()
    torch.testing.assert_close(
        logits(load_adapter(build_t5("t5-tiny"), tmp_path / "new").eval(), batch), logits(retrained, batch)
    )


def assert_untouched(model, reference):
    assert not list(adapter_layers(model)) and not hasattr(model, "peftcore_config")
    assert all(p.requires_grad for p in model.parameters())
    for (name, p), (_, q) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(p, q), name


def build_t5_of(seed=0, **shape):
    """t5-tiny with some of its shape changed (layers, d_model): quick to build."""
    torch.manual_seed(seed)
    config = t5_config("t5-tiny")
    for key, value in shape.items():
        setattr(config, key, value)
    return transformers.T5ForConditionalGeneration(config).eval()


def test_a_t5_small_adapter_and_a_t5_tiny_one_say_the_models_differ(tmp_path):
    """Both directions on the public shapes; the model is left as it was, the file's base named."""
    tiny_model = trained(build_t5("t5-tiny"), CONFIGS[0])
    tiny_model.config._name_or_path = "my/t5-tiny"
    save_adapter(tiny_model, tmp_path / "tiny")
    small = build_t5("t5-small", seed=3)
    small_copy = copy.deepcopy(small)
    with pytest.raises(
        ModelShapeMismatch,
        match=re.escape(
            "was trained on a model with 2 encoder and 2 decoder layers and d_model 64; this model has 6 encoder and "
            "6 decoder layers and d_model 512. Load it into a model of the shape it was trained on (its "
            "adapter_config.json names base_model_name_or_path='my/t5-tiny')"
        ),
    ) as refused:
        load_adapter(small, tmp_path / "tiny")
    assert isinstance(refused.value, ValueError) and refused.value.trained_on.startswith("2 encoder")
    assert refused.value.this_model.endswith("d_model 512") and refused.value.base_model == "my/t5-tiny"
    assert_untouched(small, small_copy)
    save_adapter(trained(small, CONFIGS[0]), tmp_path / "small")
    with pytest.raises(
        ModelShapeMismatch,
        match=r"^the adapter in .*small was trained on a model with 6 encoder and 6 "
        r"decoder layers and d_model 512; this model has 2 encoder and 2 "
        r"decoder layers and d_model 64\. Load it into a model of the shape",
    ):
        load_adapter(build_t5("t5-tiny"), tmp_path / "small")


@pytest.mark.parametrize(
    "file_shape, model_shape, message",
    [
        (
            {"num_layers": 3, "num_decoder_layers": 4},
            {},
            "3 encoder and 4 decoder layers; this model has 2 encoder and 2",
        ),
        (
            {},
            {"num_layers": 3, "num_decoder_layers": 4},
            "2 encoder and 2 decoder layers; this model has 3 encoder and 4",
        ),
        ({}, {"d_model": 32}, "d_model 64; this model has d_model 32"),
    ],
    ids=["deeper-file", "shallower-file", "width-only"],
)
@pytest.mark.parametrize("config", [CONFIGS[0], CONFIGS[3]], ids=["lora", "ia3"])
def test_an_adapter_for_a_deeper_shallower_or_wider_model_says_so(
    tmp_path, file_shape, model_shape, message, config
):
    save_adapter(trained(build_t5_of(**file_shape), config), tmp_path)
    target = build_t5_of(seed=3, **model_shape)
    target_copy = copy.deepcopy(target)
    with pytest.raises(ModelShapeMismatch, match=f"was trained on a model with {message}"):
        load_adapter(target, tmp_path)
    assert_untouched(target, target_copy)


def test_an_adapter_limited_to_some_layers_loads_into_a_model_that_has_them(tmp_path):
    """layers_to_transform=[0, 1] selects the same two blocks in a model of any depth: the file
    cannot tell, and what it holds fits, so it loads (the highest block is not read as the depth)."""
    config = LoRAConfig(r=4, alpha=8, layers_to_transform=(0, 1))
    save_adapter(trained(build_t5_of(num_layers=3, num_decoder_layers=3), config), tmp_path)
    for target in (build_t5("t5-tiny"), build_t5_of(num_layers=4, num_decoder_layers=4)):
        assert len(list(adapter_layers(load_adapter(target, tmp_path)))) == 2 * (
            2 + 4
        )  # q, v; decoder: cross too
    save_adapter(
        trained(build_t5_of(num_layers=4, num_decoder_layers=4), LoRAConfig(layers_to_transform=(0, 1, 2))),
        tmp_path,
    )  # block 2 is beyond t5-tiny: the file's top block is only a lower bound of the depth
    with pytest.raises(
        ModelShapeMismatch, match="with at least 3 encoder and 3 decoder layers; this model has 2 encoder"
    ):
        load_adapter(build_t5("t5-tiny"), tmp_path)


def test_adapter_with_a_wrong_shape_names_the_key(tmp_path):
    model = trained(build_t5("t5-tiny"), CONFIGS[0])
    save_adapter(model, tmp_path)
    tensors = safetensors.torch.load_file(tmp_path / WEIGHTS_NAME)
    key = "base_model.model.decoder.block.1.layer.0.SelfAttention.v.lora_B.weight"
    tensors[key] = torch.zeros(3, 3)
    safetensors.torch.save_file(tensors, tmp_path / WEIGHTS_NAME)
    target = build_t5("t5-tiny")
    reference = copy.deepcopy(target)
    with pytest.raises(
        ValueError, match=r"decoder\.block\.1\.layer\.0\.SelfAttention\.v\.lora_B\.weight.*\(3, 3\)"
    ):
        load_adapter(target, tmp_path)
    assert_untouched(target, reference)


def test_unexpected_key_is_named(tmp_path):
    save_adapter(trained(build_t5("t5-tiny"), CONFIGS[0]), tmp_path)
    tensors = safetensors.torch.load_file(tmp_path / WEIGHTS_NAME)
    tensors["base_model.model.encoder.block.0.layer.0.SelfAttention.k.lora_A.weight"] = torch.zeros(4, 64)
    safetensors.torch.save_file(tensors, tmp_path / WEIGHTS_NAME)
    with pytest.raises(ValueError, match=r"unexpected key '.*SelfAttention\.k\.lora_A\.weight'"):
        load_adapter(build_t5("t5-tiny"), tmp_path)


def test_truncated_or_corrupt_files_are_refused(tmp_path):
    model = build_t5("t5-tiny")
    reference = copy.deepcopy(model)
    save_adapter(trained(build_t5("t5-tiny"), CONFIGS[0]), tmp_path)
    data = (tmp_path / WEIGHTS_NAME).read_bytes()
    (tmp_path / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_adapter(model, tmp_path)
    (tmp_path / WEIGHTS_NAME).write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_adapter(model, tmp_path)
    (tmp_path / CONFIG_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_adapter(model, tmp_path)
    assert_untouched(model, reference)


def test_unsupported_adapter_kinds_are_refused(tmp_path):
    (tmp_path / CONFIG_NAME).write_text(json.dumps({"peft_type": "VERA"}))
    with pytest.raises(ValueError, match="'VERA' is not supported"):
        load_adapter(build_t5("t5-tiny"), tmp_path)
    for kind in ("PREFIX_TUNING", "PROMPT_TUNING"):  # a file that does not say its length
        (tmp_path / CONFIG_NAME).write_text(json.dumps({"peft_type": kind}))
        with pytest.raises(ValueError, match="num_virtual_tokens"):
            load_adapter(build_t5("t5-tiny"), tmp_path)
    with pytest.raises(FileNotFoundError, match="adapter directory"):
        load_adapter(build_t5("t5-tiny"), tmp_path / "missing")


def test_loading_into_a_model_with_a_different_adapter_is_refused(tmp_path):
    save_adapter(trained(build_t5("t5-tiny"), CONFIGS[0]), tmp_path)
    model = trained(build_t5("t5-tiny"), LoRAConfig(r=8, alpha=8, target_modules=("q", "v")))
    with pytest.raises(ValueError, match="already holds"):
        load_adapter(model, tmp_path)


def test_save_without_adapter_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no adapter"):
        save_adapter(build_t5("t5-tiny"), tmp_path)


def test_a_refused_pissa_file_leaves_the_base_exactly_as_it_was(tmp_path):
    """PiSSA rewrites the base on load; it runs only after the file passed every check."""
    model = trained(build_t5("t5-tiny"), LoRAConfig(r=4, alpha=8, init="pissa"))
    save_adapter(model, tmp_path)
    tensors = safetensors.torch.load_file(tmp_path / WEIGHTS_NAME)
    key = "base_model.model.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight"
    tensors[key] = torch.zeros(5, 64)
    safetensors.torch.save_file(tensors, tmp_path / WEIGHTS_NAME)
    target = build_t5("t5-tiny")
    reference = copy.deepcopy(target)
    with pytest.raises(ValueError, match=r"lora_A\.weight' has shape \(5, 64\)"):
        load_adapter(target, tmp_path)
    assert_untouched(target, reference)


def test_loading_into_a_model_that_computes_differently_is_refused(tmp_path):
    save_adapter(trained(build_t5("t5-tiny"), LoRAConfig(r=4, alpha=8, init="pissa")), tmp_path)
    plain = trained(build_t5("t5-tiny"), LoRAConfig(r=4, alpha=8))
    with pytest.raises(
        ValueError, match="initialised with 'kaiming' here; the file's adapter expects 'pissa'"
    ):
        load_adapter(plain, tmp_path)
    rescaled = trained(build_t5("t5-tiny"), LoRAConfig(r=4, alpha=16, init="pissa"))
    with pytest.raises(ValueError, match="scale 4 here; the file gives rank 4, scale 2"):
        load_adapter(rescaled, tmp_path)


V_LORA_B = "base_model.model.decoder.block.1.layer.0.SelfAttention.v.lora_B.weight"
BAD_VALUES = {
    "int64": (
        lambda t: (t * 100).to(torch.int64),
        r"holds '.*v\.lora_B\.weight' as torch\.int64.*floating point",
    ),
    "bool": (lambda t: t > 0, r"holds '.*v\.lora_B\.weight' as torch\.bool.*floating point"),
    "nan": (
        lambda t: t.index_put((torch.tensor([0, 1]), torch.tensor([0, 2])), torch.tensor(float("nan"))),
        r"non-finite values: '.*v\.lora_B\.weight' has 2 NaN and 0 inf values \(of 256\).*earlier checkpoint",
    ),
    "inf": (
        lambda t: t.index_put((torch.tensor([3]),), torch.tensor(float("-inf"))),
        r"non-finite values: '.*v\.lora_B\.weight' has 0 NaN and 4 inf values \(of 256\)",
    ),
}


def write_weights(directory, tensors, pickled):
    """Replace the adapter's weights file: safetensors, or peft's pickled .bin (safetensors removed)."""
    if pickled:
        (directory / WEIGHTS_NAME).unlink()
        torch.save(tensors, directory / PICKLED_WEIGHTS_NAME)
    else:
        safetensors.torch.save_file(tensors, directory / WEIGHTS_NAME)


@pytest.mark.parametrize("pickled", [False, True], ids=["safetensors", "bin"])
@pytest.mark.parametrize("bad", list(BAD_VALUES))
def test_non_float_or_non_finite_tensors_are_refused_by_name(tmp_path, bad, pickled):
    """copy_ would turn int64/bool into numbers and NaN/inf make every logit NaN: refused before any copy."""
    save_adapter(trained(build_t5("t5-tiny"), CONFIGS[0]), tmp_path)
    tensors = safetensors.torch.load_file(tmp_path / WEIGHTS_NAME)
    change, message = BAD_VALUES[bad]
    tensors[V_LORA_B] = change(tensors[V_LORA_B])
    write_weights(tmp_path, tensors, pickled)
    target = build_t5("t5-tiny")
    reference = copy.deepcopy(target)
    with pytest.raises(ValueError, match=message):
        load_adapter(target, tmp_path)
    assert_untouched(target, reference)
    holder = trained(build_t5("t5-tiny"), CONFIGS[0], seed=5)  # a model that already holds such an adapter
    before = copy.deepcopy(holder.state_dict())
    with pytest.raises(ValueError, match=message):
        load_adapter(holder, tmp_path)
    assert all(torch.equal(p, before[name]) for name, p in holder.state_dict().items())


def test_a_diverged_adapter_is_not_saved(tmp_path):
    """An adapter trained to NaN written silently is the same failure as one loaded silently."""
    model = trained(build_t5("t5-tiny"), CONFIGS[0])
    save_adapter(model, tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    layers = dict(adapter_layers(model))
    with torch.no_grad():
        layers["decoder.block.1.layer.0.SelfAttention.v"].lora_B.weight[0, 0] = float("nan")
        layers["encoder.block.0.layer.0.SelfAttention.q"].lora_A.weight[1, :3] = float("inf")
    with pytest.raises(
        ValueError,
        match=r"cannot save the adapter to .*: 'base_model\.model\.encoder\.block\.0\.layer"
        r"\.0\.SelfAttention\.q\.lora_A\.weight' has 0 NaN and 3 inf values \(of 256\), "
        r"and 1 more tensors have some\. Training diverged.*nothing was written",
    ):
        save_adapter(model, tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def save_pickled_peft_adapter(directory):
    theirs = peft.get_peft_model(
        build_t5("t5-tiny"),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"], init_lora_weights=False),
    )
    theirs.save_pretrained(directory, safe_serialization=False)
    assert (directory / PICKLED_WEIGHTS_NAME).exists()


def test_saving_over_a_pickled_peft_adapter_leaves_one_adapter(tmp_path):
    save_pickled_peft_adapter(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    unrelated = sorted(
        p.name for p in tmp_path.iterdir() if p.name not in (CONFIG_NAME, PICKLED_WEIGHTS_NAME)
    )
    ours = trained(build_t5("t5-tiny"), CONFIGS[0])
    save_adapter(ours, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME, *unrelated])
    assert (tmp_path / "notes.txt").read_text() == "mine"
    batch = t5_batch()
    torch.testing.assert_close(
        logits(load_adapter(build_t5("t5-tiny"), tmp_path), batch), logits(ours, batch)
    )


def test_a_failed_save_over_a_pickled_adapter_keeps_it(tmp_path, monkeypatch):
    save_pickled_peft_adapter(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(peftcore.checkpoint, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(trained(build_t5("t5-tiny"), CONFIGS[0]), tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before

"""Several named adapters on one base: added, switched, deleted and saved as peft does (its
subfolder layout, both ways), and a mixed batch (each row its adapter) equal to peft's
adapter_names= for LoRA in forward, greedy generate and beam search; for DoRA and IA3, which peft
refuses or ignores there, equal to each row run with its own adapter."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from helpers import build_t5, move_off_init, t5_batch

import peftcore
from peftcore import (
    DoRAConfig,
    IA3Config,
    LoRAConfig,
    PromptTuningConfig,
    active_adapter,
    adapter_names,
    adapter_rows,
    delete_adapter,
    disable_adapters,
    inject,
    load_adapter,
    save_adapter,
    set_adapter,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

CONFIGS = {
    "lora": {
        "default": LoRAConfig(r=2, alpha=4, target_modules=("q", "v")),
        "b": LoRAConfig(r=4, alpha=4, target_modules=("k", "v", "wo")),
        "c": LoRAConfig(r=8, alpha=32, target_modules=("q", "o"), use_rslora=True),
    },
    "dora": {
        "default": DoRAConfig(r=2, alpha=4, target_modules=("q", "v")),
        "b": DoRAConfig(r=4, alpha=8, target_modules=("k", "v", "wo")),
    },
    "ia3": {
        "default": IA3Config(target_modules=("k", "v", "wo"), feedforward_modules=("wo",)),
        "b": IA3Config(target_modules=("q", "wi"), feedforward_modules=()),
    },
}


def with_adapters(kind: str):
    """t5-tiny with every adapter of ``kind``, each moved off its init while it was active."""
    model = build_t5("t5-tiny")
    for seed, (name, config) in enumerate(CONFIGS[kind].items()):
        inject(model, config, name=name)
        set_adapter(model, name)
        move_off_init(model, seed + 1)
    set_adapter(model, "default")
    return model.eval()


def logits(model, batch, **kwargs):
    with torch.no_grad():
        return model(**batch, **kwargs).logits


def per_adapter(model, batch):
    out = {}
    for name in adapter_names(model):
        set_adapter(model, name)
        out[name] = logits(model, batch)
    with disable_adapters(model):
        out["__base__"] = logits(model, batch)
    set_adapter(model, "default")
    return out


ROWS = ["b", "default", "__base__", "c", "b"]


def test_added_adapters_are_inactive_and_frozen_and_switch_as_in_peft():
    model = build_t5("t5-tiny")
    inject(model, CONFIGS["lora"]["default"])
    first = {n for n, p in model.named_parameters() if p.requires_grad}
    inject(model, CONFIGS["lora"]["b"], name="b")
    assert adapter_names(model) == ["default", "b"] and active_adapter(model) == "default"
    assert {n for n, p in model.named_parameters() if p.requires_grad} == first
    set_adapter(model, "b")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.rsplit(".", 2)[0].endswith((".k", ".v", ".wo")) for n in trainable)
    assert model.peftcore_config == CONFIGS["lora"]["b"]
    assert peftcore.count_parameters(model).trainable == sum(
        p.numel() for p in model.parameters() if p.requires_grad
    )

    delete_adapter(model, "b")  # the active one: the first remaining takes over
    assert adapter_names(model) == ["default"] and active_adapter(model) == "default"
    assert {n for n, p in model.named_parameters() if p.requires_grad} == first
    delete_adapter(model, "default")
    assert adapter_names(model) == [] and not any(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("kind", CONFIGS)
def test_a_mixed_batch_row_is_its_adapters_output(kind):
    model = with_adapters(kind)
    rows = [r for r in ROWS if r in CONFIGS[kind] or r == "__base__"]
    batch = t5_batch(batch=len(rows), seed=4)
    expected = per_adapter(model, batch)
    with adapter_rows(model, rows):
        mixed = logits(model, batch)
    for i, name in enumerate(rows):
        torch.testing.assert_close(mixed[i], expected[name][i], atol=1e-5, rtol=1e-4)  # rows apart: rounding
    assert not torch.allclose(expected["default"], expected["b"])  # adapters that differ
    assert torch.equal(logits(model, batch), expected["default"])  # the block leaves the model as it was


def peft_copy(model, tmp_path):
    """peft holding the same adapters, loaded from our save (peft's subfolder layout)."""
    save_adapter(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(build_t5("t5-tiny"), tmp_path)
    for name in adapter_names(model):
        if name != "default":
            theirs.load_adapter(tmp_path / name, adapter_name=name)
    return theirs.eval()


def test_lora_mixed_batch_equals_peft_adapter_names_in_forward_generate_and_beam_search(tmp_path):
    model = with_adapters("lora")
    theirs = peft_copy(model, tmp_path)
    batch = t5_batch(batch=len(ROWS), seed=5)
    with adapter_rows(model, ROWS):
        ours = logits(model, batch)
    torch.testing.assert_close(ours, logits(theirs, batch, adapter_names=ROWS), atol=1e-6, rtol=1e-6)

    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "max_new_tokens": 6}
    for beams in (1, 3):
        with adapter_rows(model, ROWS), torch.no_grad():
            generated = model.generate(**inputs, num_beams=beams)
        with torch.no_grad():
            expected = theirs.generate(**inputs, num_beams=beams, adapter_names=ROWS)
        assert torch.equal(generated, expected), beams


def test_saved_in_peft_layout_and_loaded_back_by_name_both_ways(tmp_path):
    model = with_adapters("lora")
    batch = t5_batch(batch=2, seed=6)
    expected = per_adapter(model, batch)
    save_adapter(model, tmp_path / "ours")
    assert (tmp_path / "ours/adapter_config.json").is_file()
    assert all((tmp_path / "ours" / n / "adapter_model.safetensors").is_file() for n in ("b", "c"))

    theirs = peft_copy(model, tmp_path / "again")
    for name in adapter_names(model):
        theirs.set_adapter(name)
        torch.testing.assert_close(logits(theirs, batch), expected[name], atol=1e-5, rtol=1e-5)
    theirs.save_pretrained(tmp_path / "peft")  # every adapter: default on top, b/ and c/ beside

    loaded = load_adapter(build_t5("t5-tiny"), tmp_path / "peft")
    for name in ("b", "c"):
        load_adapter(loaded, tmp_path / "peft" / name, name=name)
    assert adapter_names(loaded) == ["default", "b", "c"] and active_adapter(loaded) == "default"
    for name in adapter_names(loaded):
        set_adapter(loaded, name)
        torch.testing.assert_close(logits(loaded.eval(), batch), expected[name], atol=1e-5, rtol=1e-5)

    set_adapter(loaded, "b")
    move_off_init(loaded, 9)  # b trained on ...
    load_adapter(loaded, tmp_path / "ours" / "b", name="b")  # ... and an existing name loads into it
    torch.testing.assert_close(logits(loaded.eval(), batch), expected["b"], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="does not compute what the model's adapter does"):
        load_adapter(loaded, tmp_path / "ours" / "b", name="c")  # another shape


def test_what_cannot_share_a_base_or_a_batch_is_refused_by_name(tmp_path):
    model = with_adapters("lora")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cases = [
        (lambda: inject(model, LoRAConfig(target_modules=("q",)), name="b"), "already has an adapter named 'b'"),
        (lambda: inject(model, LoRAConfig(target_modules=("q",), init="pissa"), name="p"), "rewrites the base"),
        (lambda: inject(model, PromptTuningConfig(), name="p"), "input method"),
        (lambda: inject(model, LoRAConfig(target_modules=("q",), modules_to_save=("lm_head",)), name="m"), "modules_to_save"),
        (lambda: inject(model, LoRAConfig(target_modules=("q",)), name="__base__"), "adapter name"),
        (lambda: inject(model, LoRAConfig(target_modules=("q",))), "give it a name"),
        (lambda: set_adapter(model, "nope"), "no adapter named 'nope'"),
        (lambda: save_adapter(model, tmp_path, names=["nope"]), "no adapters named"),
    ]  # fmt: skip
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert adapter_names(model) == ["default", "b", "c"]

    batch = t5_batch(batch=2)
    with pytest.raises(ValueError, match="'nope'"), adapter_rows(model, ["default", "nope"]):
        pass
    model.train()
    with pytest.raises(ValueError, match="model.eval"), adapter_rows(model, ["default", "b"]):
        pass
    model.eval()
    with pytest.raises(ValueError, match="one name per row"), adapter_rows(model, ["default", "b", "c"]):
        logits(model, batch)
    assert torch.equal(logits(model, batch), logits(copy.deepcopy(model), batch))  # nothing left behind
    four = t5_batch(batch=4)  # 2 names for 4 rows: not read as beams (peft refuses it too)
    with pytest.raises(ValueError, match="one name per row"), adapter_rows(model, ["default", "b"]):
        logits(model, four)


def test_inactive_adapters_follow_the_models_mode_device_and_dtype():
    """They are not the model's submodules, so eval()/to() reach them when they come in."""
    model = with_adapters("lora")  # built in train mode, then eval()
    batch = t5_batch(batch=2)
    set_adapter(model, "b")
    assert all(not m.training for m in model.modules())
    assert torch.equal(logits(model, batch), logits(model, batch))  # no dropout drawn
    set_adapter(model, "default")
    model.to(torch.float64)
    set_adapter(model, "c")
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.float64}


def test_a_refused_load_keeps_every_adapter_and_what_nests_badly_is_refused(tmp_path):
    model = with_adapters("lora")
    wide = build_t5("t5-small")  # another width: refused inside the load, after the model was set aside
    inject(wide, LoRAConfig(r=4, target_modules=("q", "v")))
    save_adapter(wide, tmp_path / "wide")
    with pytest.raises(ValueError, match="cannot load|width|shape"):
        load_adapter(model, tmp_path / "wide", name="w")
    assert adapter_names(model) == ["default", "b", "c"] and active_adapter(model) == "default"

    with adapter_rows(model, ["default", "b"]):
        for call, what in [
            (lambda: set_adapter(model, "b"), "set_adapter"),
            (lambda: delete_adapter(model, "c"), "delete_adapter"),
            (lambda: disable_adapters(model).__enter__(), "disable_adapters"),
        ]:
            with pytest.raises(ValueError, match=f"{what} inside adapter_rows"):
                call()
    with disable_adapters(model):
        with pytest.raises(ValueError, match="inside disable_adapters"):
            set_adapter(model, "b")
        with pytest.raises(ValueError, match="inside disable_adapters"), adapter_rows(model, ["b"]):
            pass
    assert active_adapter(model) == "default" and model.peftcore_config == CONFIGS["lora"]["default"]
    save_adapter(model, tmp_path / "none", names=[])  # peft's selected_adapters=[]: nothing
    assert not (tmp_path / "none").exists() or not any((tmp_path / "none").iterdir())

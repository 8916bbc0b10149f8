"""IA3Scaler: the two scaling rules, exact merge/unmerge, and parity with HF peft."""

import copy

import peft
import pytest
import torch
from helpers import assert_merged_matches_peft, t5_batch
from torch import nn

from peftcore import IA3Config, IA3Scaler, inject, unmerge
from peftcore.surgery import adapter_layers


def test_scaling_rules_and_identity_at_init():
    base = nn.Linear(10, 6)
    x = torch.randn(3, 10)
    ff, out = (
        IA3Scaler(copy.deepcopy(base), feedforward=True),
        IA3Scaler(copy.deepcopy(base), feedforward=False),
    )
    assert ff.scale.shape == (10,) and out.scale.shape == (6,)
    assert torch.equal(ff(x), base(x)) and torch.equal(out(x), base(x))
    with torch.no_grad():
        ff.scale.uniform_(0.5, 1.5), out.scale.uniform_(0.5, 1.5)
    torch.testing.assert_close(ff(x), base(x * ff.scale))
    torch.testing.assert_close(out(x), base(x) * out.scale)
    assert {n for n, p in ff.named_parameters() if p.requires_grad} == {"scale"}


@pytest.mark.parametrize("feedforward", [True, False])
def test_merge_unmerge_round_trips(feedforward):
    layer = IA3Scaler(nn.Linear(32, 16), feedforward=feedforward)
    weight, bias = layer.base.weight.detach().clone(), layer.base.bias.detach().clone()
    with torch.no_grad():
        layer.scale.uniform_(0.2, 3.0)
    x = torch.randn(4, 32)
    before = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), before, atol=1e-5, rtol=1e-5)
    layer.unmerge()
    assert ((layer.base.weight - weight).abs() / weight.abs().clamp_min(1e-12)).max() < 1e-6
    assert ((layer.base.bias - bias).abs() / bias.abs().clamp_min(1e-12)).max() < 1e-6


def test_merge_refuses_a_zero_scale_and_changes_nothing():
    layer = IA3Scaler(nn.Linear(8, 4), feedforward=False)
    weight = layer.base.weight.detach().clone()
    with torch.no_grad():
        layer.scale[2] = 0.0
    with pytest.raises(ValueError, match="1 zero entries"):
        layer.merge()
    assert torch.equal(layer.base.weight, weight) and not layer.merged


def peft_ia3(model, config: IA3Config):
    return peft.get_peft_model(
        model,
        peft.IA3Config(
            target_modules=list(config.target_modules),
            feedforward_modules=list(config.feedforward_modules),
            task_type="SEQ_2_SEQ_LM",
        ),
    )


@pytest.mark.parametrize(
    "config",
    [
        IA3Config(),
        IA3Config(target_modules=("q", "k", "v", "o", "wi", "wo", "lm_head"), feedforward_modules=("wo",)),
    ],
    ids=["defaults", "all-linear"],
)
@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
def test_forward_and_gradients_match_peft(twin_tiny_t5, config, merged):
    ours, theirs = twin_tiny_t5
    inject(ours, config)
    theirs = peft_ia3(theirs, config)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, layer in adapter_layers(ours):
            layer.scale.copy_(torch.rand(layer.scale.shape, generator=g) + 0.5)
            ref = theirs.get_submodule("base_model.model." + name)
            assert ref.ia3_l["default"].numel() == layer.scale.numel()
            ref.ia3_l["default"].copy_(layer.scale.view(ref.ia3_l["default"].shape))
    batch = t5_batch()
    if merged:
        assert_merged_matches_peft(ours, theirs, batch, config)
        unmerge(ours)
    for model in (ours, theirs):
        model.zero_grad()
        model(**batch).loss.backward()
    with torch.no_grad():
        torch.testing.assert_close(ours(**batch).logits, theirs(**batch).logits, atol=1e-5, rtol=1e-5)
    for name, layer in adapter_layers(ours):
        ref = theirs.get_submodule("base_model.model." + name).ia3_l["default"]
        torch.testing.assert_close(layer.scale.grad, ref.grad.flatten(), atol=1e-5, rtol=1e-4)

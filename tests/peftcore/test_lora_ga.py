"""LoRA-GA: the gradient estimate, the factors, equality with peft's preprocess_loraga + lora_ga init
on the same gradient and seed, the model unchanged at step 0, and files that load exactly in peft."""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
from helpers import build_t5, t5_batch

from peftcore import LoRAConfig, inject, load_adapter, save_adapter
from peftcore.checkpoint import CONFIG_NAME
from peftcore.dora import DoRAConfig
from peftcore.lora_ga import (
    GRADIENT_ATTRIBUTE,
    estimate_gradients,
    lora_ga_factors,
    starting_factors,
    use_starting_factors,
)
from peftcore.surgery import adapter_layers

TARGETS = ("q", "v", "wi")


def train_step(model, batches=2):
    """Two batches, so that the mean is a sum over passes divided by their number."""

    def step() -> None:
        for seed in range(batches):
            model(**t5_batch(seed=seed)).loss.backward()

    return step


def logits(model):
    model.eval()
    with torch.no_grad():
        return model(**t5_batch()).logits


def peft_lora_ga(model, config: LoRAConfig, seed: int):
    peft_config = peft.LoraConfig(
        r=config.r,
        lora_alpha=config.alpha,
        target_modules=list(config.target_modules),
        init_lora_weights="lora_ga",
        lora_ga_config=peft.LoraGAConfig(
            direction=config.lora_ga_direction,
            scale=config.lora_ga_scale,
            stable_gamma=config.lora_ga_stable_gamma,
        ),
        use_rslora=config.use_rslora,
        task_type="SEQ_2_SEQ_LM",
    )
    torch.manual_seed(seed)  # the model trains in estimation: T5's dropout draws the same masks
    peft.preprocess_loraga(model, peft_config, train_step(model))
    torch.manual_seed(seed + 1)
    return peft.get_peft_model(model, peft_config)


def test_the_gradient_is_the_mean_over_passes_and_nothing_else_changes():
    model = build_t5("t5-tiny")
    model.eval()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    config = LoRAConfig(r=2, alpha=4, target_modules=("q",), init="lora_ga")
    torch.manual_seed(3)  # the model trains: T5's dropout masks from the default generator
    gradients = estimate_gradients(model, config, train_step(model))

    reference = build_t5("t5-tiny")  # the same weights (seeded build), plain autograd
    reference.train()
    torch.manual_seed(3)
    for seed in range(2):
        reference(**t5_batch(seed=seed)).loss.backward()
    for name, gradient in gradients.items():
        expected = reference.get_submodule(name).weight.grad / 2
        torch.testing.assert_close(gradient, expected, atol=1e-6, rtol=1e-5)
        assert getattr(model.get_submodule(name), GRADIENT_ATTRIBUTE) is gradient
    assert not model.training and {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize(
    "direction,scale",
    [("ArB2r", "stable"), ("A2rBr", "weight_svd"), ("ArBr", "gd_scale"), ("random", "unit")],
)
def test_factors_weights_and_logits_equal_peft(direction, scale):
    base = build_t5("t5-tiny")
    config = LoRAConfig(
        r=4, alpha=8, target_modules=TARGETS, init="lora_ga", lora_ga_direction=direction, lora_ga_scale=scale
    )
    ours = copy.deepcopy(base)
    torch.manual_seed(5)  # the model trains in estimation: T5's dropout draws from the default generator
    estimate_gradients(ours, config, train_step(ours))
    torch.manual_seed(6)  # and so do svd_lowrank and the random direction
    inject(ours, config)
    theirs = peft_lora_ga(copy.deepcopy(base), config, seed=5)
    compared = 0
    for name, layer in adapter_layers(ours):
        ref = theirs.get_submodule("base_model.model." + name)
        torch.testing.assert_close(layer.lora_A.weight, ref.lora_A["default"].weight, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(layer.lora_B.weight, ref.lora_B["default"].weight, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(layer.base.weight, ref.get_base_layer().weight, atol=1e-6, rtol=1e-5)
        assert layer.lora_B.weight.abs().max() > 0 and not hasattr(layer.base, GRADIENT_ATTRIBUTE)
        compared += 1
    assert (
        compared == 2 * 3 + 2 * 5
    )  # per encoder block q, v, wi; per decoder block q, v twice (self, cross), wi
    torch.testing.assert_close(logits(ours), logits(theirs), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits(ours), logits(base), atol=1e-4, rtol=1e-4)  # unchanged at step 0


def test_the_factors_are_the_docstrings_equations():
    gradient = torch.randn(12, 10, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    A, B = lora_ga_factors(
        gradient, torch.randn(12, 10), r=3, lora_scale=2.0, direction="ArB2r", scale="unit"
    )
    U, S, Vh = torch.linalg.svd(gradient)
    # the randomised SVD with q = min(4r, ...) = 10 recovers the exact one up to each direction's sign
    for k in range(3):
        assert torch.allclose(A[k].abs(), Vh[k].abs(), atol=1e-4)
        assert torch.allclose(B[:, k].abs(), (U[:, 3 + k] * S[3 + k]).abs(), atol=1e-4)
    with pytest.raises(ValueError, match="2r = 12 singular directions.*lower r"):
        lora_ga_factors(gradient, gradient, r=6, lora_scale=1.0)


def test_saved_converted_and_loads_exactly_in_peft_and_here(tmp_path):
    base = build_t5("t5-tiny")
    config = LoRAConfig(r=4, alpha=8, target_modules=TARGETS, init="lora_ga")
    ours = copy.deepcopy(base)
    estimate_gradients(ours, config, train_step(ours))
    inject(ours, config)
    with torch.no_grad():  # training moves A and B away from the start
        for _, layer in adapter_layers(ours):
            layer.lora_A.weight.add_(0.05 * torch.randn_like(layer.lora_A.weight))
            layer.lora_B.weight.add_(0.05 * torch.randn_like(layer.lora_B.weight))
    save_adapter(ours, tmp_path)
    saved = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert saved["r"] == 8 and saved["lora_alpha"] == 16 and saved["init_lora_weights"] is True
    expected = logits(ours)
    assert (expected - logits(base)).abs().max() > 1e-3  # the adapter does something
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(logits(theirs), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        logits(load_adapter(copy.deepcopy(base), tmp_path)), expected, atol=1e-5, rtol=1e-5
    )


def test_inject_without_gradients_and_other_misuse_are_refused():
    model = build_t5("t5-tiny")
    with pytest.raises(ValueError, match="run peftcore.lora_ga.estimate_gradients"):
        inject(model, LoRAConfig(r=2, alpha=4, target_modules=("q",), init="lora_ga"))
    with pytest.raises(ValueError, match="lora_ga with DoRA is not supported"):
        inject(build_t5("t5-tiny"), DoRAConfig(r=2, alpha=4, target_modules=("q",), init="lora_ga"))
    with pytest.raises(ValueError, match="LoRAConfig.lora_ga_direction"):
        LoRAConfig(init="lora_ga", lora_ga_direction="BA")
    with pytest.raises(ValueError, match="no backward pass through"):
        estimate_gradients(
            build_t5("t5-tiny"), LoRAConfig(target_modules=("q",), init="lora_ga"), lambda: None
        )
    from peftcore import NF4Config, quantize

    quantized = quantize(build_t5("t5-tiny"), NF4Config())
    with pytest.raises(ValueError, match="full-precision gradients of dense weights"):
        estimate_gradients(quantized, LoRAConfig(target_modules=("q",), init="lora_ga"), lambda: None)


def test_starting_factors_rebuild_the_same_start_without_data():
    config = LoRAConfig(r=2, alpha=4, target_modules=TARGETS, init="lora_ga")
    first = build_t5("t5-tiny")
    torch.manual_seed(0)
    estimate_gradients(first, config, train_step(first))
    inject(first, config)
    factors = starting_factors(first)
    assert len(factors) == len(list(adapter_layers(first))) > 0

    again = build_t5("t5-tiny")  # the same original weights, no gradient estimated
    use_starting_factors(again, config, factors)
    inject(again, config)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values()))

    fresh = build_t5("t5-tiny")
    with pytest.raises(ValueError, match="missing for"):
        use_starting_factors(fresh, LoRAConfig(r=2, target_modules=("q", "k"), init="lora_ga"), factors)
    narrow = {name: {"A": f["A"][:, :-1], "B": f["B"]} for name, f in factors.items()}
    with pytest.raises(ValueError, match="have shapes"):
        use_starting_factors(fresh, config, narrow)

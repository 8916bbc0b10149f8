"""QLoRA = LoRALinear over an NF4Linear base: the study's figures, training, merge and unload."""

import copy

import pytest
import torch
from conftest import build_t5, t5_batch

import peftcore
from peftcore import LoRAConfig, NF4Config, NF4Linear, count_parameters, inject, memory_footprint, quantize, unload
from peftcore.surgery import adapter_layers

GIB = 2**30


def test_t5_base_qlora_figures():
    """t5-base, NF4 with double quantization, LoRA r=16 on q,v: the study's 1,769,472 trainable
    parameters and a footprint within 2% of 0.3776 GiB (bitsandbytes does not count its
    quantization state; we do, as buffers)."""
    model = build_t5("t5-base", seed=0)
    logical_total = count_parameters(model).total
    quantize(model, NF4Config(blocksize=64, double_quant=True))
    inject(model, LoRAConfig(r=16, alpha=32, target_modules=("q", "v")))
    counts = count_parameters(model)
    assert counts.trainable == 1_769_472
    assert counts.total == logical_total + counts.trainable  # 4-bit weights counted unpacked
    footprint = memory_footprint(model) / GIB
    print(f"t5-base QLoRA r=16: {counts} || memory footprint: {footprint:.4f} GiB")
    assert footprint == pytest.approx(0.3776, rel=0.02)
    nf4 = [m for m in model.modules() if isinstance(m, NF4Linear)]
    packed = sum(m.in_features * m.out_features for m in nf4) / 2 / GIB
    assert packed < footprint


def test_qlora_trains_with_paged_adamw():
    torch.manual_seed(0)
    model = build_t5("t5-small")
    quantize(model, NF4Config(compute_dtype=torch.float32))
    inject(model, LoRAConfig(r=8, alpha=16, target_modules=("q", "k", "v", "o")))
    model.train()
    optimizer = peftcore.PagedAdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3, weight_decay=0.0)
    batch = t5_batch(batch=4, src=16, tgt=6)
    losses = []
    for _ in range(30):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    assert all(not p.requires_grad for m in model.modules() if isinstance(m, NF4Linear) for p in m.parameters())


def test_lora_over_nf4_is_base_plus_update():
    model = build_t5("t5-tiny")
    quantize(model, NF4Config(compute_dtype=torch.float32))
    inject(model, LoRAConfig(r=4, alpha=8, target_modules=("q",)))
    name, layer = next(adapter_layers(model))
    assert isinstance(layer.base, NF4Linear)
    torch.nn.init.normal_(layer.lora_B.weight, std=0.1)
    x = torch.randn(3, layer.in_features)
    expected = x @ layer.base.dequantize(torch.float32).T + 2.0 * x @ layer.lora_A.weight.T @ layer.lora_B.weight.T
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_merge_into_nf4_is_lossy_by_a_measured_amount():
    model = build_t5("t5-tiny")
    quantize(model, NF4Config(compute_dtype=torch.float32))
    inject(model, LoRAConfig(r=4, alpha=8, target_modules=("q", "v")))
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            layer.lora_B.weight.normal_(std=0.05)
    batch = t5_batch()
    with torch.no_grad():
        adapted = model(**batch).logits
        peftcore.merge(model)
        merged = model(**batch).logits
    error = ((merged - adapted).norm() / adapted.norm()).item()
    print(f"relative logit error of merging LoRA into NF4 (re-quantization): {error:.4f}")
    assert 0 < error < 0.1  # re-quantizing W + sBA rounds it to the NF4 grid again


def test_unload_without_merge_gives_back_the_nf4_model():
    model = build_t5("t5-tiny")
    quantize(model, NF4Config())
    reference = copy.deepcopy(model)
    inject(model, LoRAConfig(target_modules=("q", "v")))
    unload(model, merge=False)
    assert not list(adapter_layers(model))
    assert sum(isinstance(m, NF4Linear) for m in model.modules()) == sum(
        isinstance(m, NF4Linear) for m in reference.modules()
    )
    for (k, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), k

"""DoRA's row norm from the low-rank identity equals the norm of the formed matrix W + s B A."""

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import peftcore
from peftcore.weights import dense_weight


def base_layer(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "conv1d":
        return Conv1D(96, 80)  # GPT-2's layer: weight (in=80, out=96)
    linear = nn.Linear(80, 96)
    if kind == "nf4":
        return peftcore.NF4Linear.from_linear(linear, peftcore.NF4Config(compute_dtype=torch.float32))
    return linear


@pytest.mark.parametrize("kind", ["linear", "conv1d", "nf4"])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_row_norm_equals_the_norm_of_the_formed_weight(kind, use_rslora):
    layer = peftcore.DoRALinear(base_layer(kind), r=8, alpha=16, use_rslora=use_rslora)
    with torch.no_grad():  # B != 0: the cross and low-rank terms count
        layer.lora_B.weight.normal_(0, 0.3)
    weight = dense_weight(layer.base, torch.float32)
    formed = torch.linalg.norm(weight + layer.scale * (layer.lora_B.weight @ layer.lora_A.weight), dim=1)
    torch.testing.assert_close(layer.row_norm(weight), formed, rtol=2e-6, atol=1e-6)
    assert not layer.row_norm(weight).requires_grad  # a constant in backward (the paper's 4.3)


def test_row_norm_in_float64_is_exact_to_float64_rounding():
    layer = peftcore.DoRALinear(nn.Linear(64, 48).double(), r=4, alpha=8)
    with torch.no_grad():
        layer.lora_B.weight.normal_(0, 1.0)
    weight = layer.base.weight
    formed = torch.linalg.norm(weight + layer.scale * (layer.lora_B.weight @ layer.lora_A.weight), dim=1)
    torch.testing.assert_close(layer.row_norm(weight), formed, rtol=1e-12, atol=1e-12)

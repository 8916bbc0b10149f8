"""LoRALinear: invariants, and forward/gradient/init parity with HF peft on the same weights."""

import copy
import math

import peft
import pytest
import torch
from helpers import assert_merged_matches_peft, build_t5, t5_batch
from torch import nn

from peftcore import LoRAConfig, LoRALinear, disable_adapters, inject, merge, unmerge
from peftcore.lora_init import olora_factors, pissa_factors
from peftcore.surgery import adapter_layers

PEFT_INIT = {
    "kaiming": True,
    "gaussian": "gaussian",
    "pissa": "pissa",
    "pissa_niter_4": "pissa_niter_4",
    "olora": "olora",
}


def peft_lora(model, config: LoRAConfig):
    return peft.get_peft_model(
        model,
        peft.LoraConfig(
            r=config.r,
            lora_alpha=config.alpha,
            lora_dropout=config.dropout,
            target_modules=list(config.target_modules),
            init_lora_weights=PEFT_INIT[config.init],
            use_rslora=config.use_rslora,
            task_type="SEQ_2_SEQ_LM",
        ),
    )


def randomise_adapter(model, seed=3):
    """Non-zero B, so the adapter path actually contributes to outputs and gradients."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            layer.lora_A.weight.copy_(torch.randn(layer.lora_A.weight.shape, generator=g) * 0.1)
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.1)


def copy_into_peft(ours, theirs):
    with torch.no_grad():
        for name, layer in adapter_layers(ours):
            ref = theirs.get_submodule("base_model.model." + name)
            ref.lora_A["default"].weight.copy_(layer.lora_A.weight)
            ref.lora_B["default"].weight.copy_(layer.lora_B.weight)
            ref.get_base_layer().weight.copy_(layer.base.weight)


def loss_and_grads(model, batch):
    model.zero_grad()
    out = model(**batch)
    out.loss.backward()
    return out.logits.detach()


# --- the layer on its own ---------------------------------------------------------------------


def test_kaiming_init_leaves_output_unchanged():
    base = nn.Linear(32, 24)
    layer = LoRALinear(copy.deepcopy(base), r=4, alpha=8)
    x = torch.randn(5, 32)
    assert torch.equal(layer(x), base(x))
    assert layer.lora_A.weight.abs().sum() > 0 and layer.lora_B.weight.abs().sum() == 0


def test_only_adapter_trains_and_scale_follows_rslora():
    layer = LoRALinear(nn.Linear(16, 16), r=4, alpha=8, use_rslora=True)
    assert layer.scale == pytest.approx(8 / math.sqrt(4))
    assert LoRALinear(nn.Linear(16, 16), r=4, alpha=8).scale == 2.0
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A.weight", "lora_B.weight"}


def test_forward_is_base_plus_scaled_low_rank_update():
    layer = LoRALinear(nn.Linear(20, 12), r=3, alpha=6)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(4, 20)
    expected = layer.base(x) + 2.0 * x @ layer.lora_A.weight.T @ layer.lora_B.weight.T
    torch.testing.assert_close(layer(x), expected)


def unfused(layer: LoRALinear, x: torch.Tensor) -> torch.Tensor:
    """The layer's equation written out, for autograd to differentiate."""
    update = nn.functional.linear(nn.functional.linear(x, layer.lora_A.weight), layer.lora_B.weight)
    return layer.base(x) + layer.scale * update


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("input_grad", [True, False])
@pytest.mark.parametrize("alpha", [6.0, 5.0])  # s = 2 (exact) and s = 5/3
def test_the_fused_forward_and_backward_equal_autograds(bias, input_grad, alpha):
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(20, 12, bias=bias), r=3, alpha=alpha).train()
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(2, 4, 20, requires_grad=input_grad)
    assert layer.uses_fused_kernel(x)
    results = []
    for forward in (layer, lambda x: unfused(layer, x)):
        layer.zero_grad()
        x.grad = None
        out = forward(x)
        (out * torch.linspace(-1, 1, 12)).sum().backward()
        results.append((out, layer.lora_A.weight.grad, layer.lora_B.weight.grad, x.grad))
    (fused_out, *fused_grads), (out, *grads) = results
    torch.testing.assert_close(fused_out, out)
    for fused_grad, grad in zip(fused_grads, grads):
        assert (fused_grad is None) == (grad is None) and (
            grad is None or torch.allclose(fused_grad, grad, atol=1e-6)
        )
    assert layer.base.weight.grad is None


def test_the_fused_path_under_autocast_computes_in_the_autocast_dtype():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(32, 16), r=4, alpha=8)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(6, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
        expected = unfused(layer, x)  # every linear of it autocast to bf16
    assert out.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected.float(), atol=2e-2, rtol=2e-2)
    out.float().sum().backward()
    assert layer.lora_A.weight.grad.dtype == torch.float32 and layer.lora_B.weight.grad.abs().sum() > 0


def test_mixed_dtypes_and_nf4_bases_take_the_unfused_path_and_dropout_only_on_the_cpu():
    on_meta = LoRALinear(
        nn.Linear(8, 8, device="meta"), r=2, alpha=2, dropout=0.1
    )  # stands for an accelerator
    assert not on_meta.train().uses_fused_kernel(torch.empty(3, 8, device="meta"))
    x = torch.randn(3, 8)
    dropping = LoRALinear(nn.Linear(8, 8), r=2, alpha=2, dropout=0.1)
    assert dropping.train().uses_fused_kernel(x) and dropping.eval().uses_fused_kernel(x)
    half_base = LoRALinear(nn.Linear(8, 8).to(torch.bfloat16), r=2, alpha=2)
    half_base.lora_A.float(), half_base.lora_B.float()
    assert not half_base.uses_fused_kernel(x.bfloat16()) and half_base(x.bfloat16()).dtype == torch.bfloat16


def test_update_has_rank_at_most_r():
    layer = LoRALinear(nn.Linear(64, 48), r=5, alpha=5)
    nn.init.normal_(layer.lora_B.weight)
    assert torch.linalg.matrix_rank(layer.delta_weight()) <= 5


@pytest.mark.parametrize("init", ["kaiming", "gaussian", "pissa", "pissa_niter_2", "olora"])
def test_merge_then_unmerge_is_identity(init):
    base = nn.Linear(40, 30)
    original = base.weight.detach().clone()
    layer = LoRALinear(base, r=4, alpha=8, init=init).eval()
    nn.init.normal_(layer.lora_B.weight, std=0.1)
    x = torch.randn(6, 40)
    before = layer(x)
    residual = layer.base.weight.detach().clone()
    layer.merge()
    torch.testing.assert_close(layer(x), before, atol=1e-5, rtol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(layer.base.weight, residual, atol=1e-6, rtol=0)
    torch.testing.assert_close(layer(x), before, atol=1e-5, rtol=1e-5)
    if init in ("kaiming", "gaussian"):
        torch.testing.assert_close(layer.base.weight, original, atol=1e-6, rtol=0)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_principal_inits_keep_the_output_at_step_zero(init):
    base = nn.Linear(48, 32)
    x = torch.randn(3, 48)
    expected = base(x).detach()
    layer = LoRALinear(base, r=8, alpha=16, init=init)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_the_principal_factors_are_the_docstrings_equations():
    """pissa_factors: s B A = U_r S_r V_r^T, A and B sharing sqrt(S_r / s); olora_factors: B A = Q_r R_r
    with B's columns orthonormal."""
    torch.manual_seed(0)
    r, scale = 4, 2.5
    weight = torch.randn(30, r) @ torch.randn(r, 40) + 0.01 * torch.randn(30, 40)  # a clear top-r part
    U, S, Vh = torch.linalg.svd(weight, full_matrices=False)
    A, B = pissa_factors(weight, r, scale)
    assert A.shape == (r, 40) and B.shape == (30, r)
    torch.testing.assert_close(scale * B @ A, U[:, :r] @ torch.diag(S[:r]) @ Vh[:r])
    torch.testing.assert_close(A.norm(dim=1), torch.sqrt(S[:r] / scale))
    A, B = pissa_factors(weight, r, scale, niter=2)  # randomised: close to the top-r part
    torch.testing.assert_close(scale * B @ A, U[:, :r] @ torch.diag(S[:r]) @ Vh[:r], atol=1e-3, rtol=0)
    A, B = olora_factors(weight, r)
    Q, R = torch.linalg.qr(weight)
    torch.testing.assert_close(B @ A, Q[:, :r] @ R[:r])
    torch.testing.assert_close(B.T @ B, torch.eye(r), atol=1e-5, rtol=0)


def test_disable_adapters_runs_the_base_alone(tiny_t5):
    reference = copy.deepcopy(tiny_t5)
    inject(tiny_t5, LoRAConfig(r=4, alpha=8, target_modules=("q", "v")))
    randomise_adapter(tiny_t5)
    batch = t5_batch()
    with torch.no_grad():
        adapted = tiny_t5(**batch).logits
        with disable_adapters(tiny_t5):
            disabled = tiny_t5(**batch).logits
        again = tiny_t5(**batch).logits
        base = reference(**batch).logits
    torch.testing.assert_close(disabled, base)
    torch.testing.assert_close(again, adapted)
    assert not torch.allclose(adapted, base)
    merge(tiny_t5)
    with pytest.raises(RuntimeError, match="unmerge"), disable_adapters(tiny_t5):
        pass
    unmerge(tiny_t5)


# --- parity with peft --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        LoRAConfig(r=4, alpha=8, target_modules=("q", "v")),
        LoRAConfig(r=4, alpha=8, target_modules=("q", "v"), init="gaussian"),
        LoRAConfig(
            r=8, alpha=16, target_modules=("q", "k", "v", "o", "wi", "wo", "lm_head"), use_rslora=True
        ),
        LoRAConfig(r=4, alpha=32, target_modules=("q", "v"), dropout=0.1),  # dropout is off in eval
        LoRAConfig(r=4, alpha=8, target_modules=("q", "v"), init="pissa"),
        LoRAConfig(r=4, alpha=8, target_modules=("k", "wo"), init="olora"),
    ],
    ids=["kaiming", "gaussian", "rslora-all-linear", "dropout-eval", "pissa", "olora"],
)
@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
def test_forward_and_gradients_match_peft(twin_tiny_t5, config, merged):
    ours, theirs = twin_tiny_t5
    inject(ours, config)
    theirs = peft_lora(theirs, config)
    randomise_adapter(ours)
    copy_into_peft(ours, theirs)
    ours.eval(), theirs.eval()
    batch = t5_batch()
    if merged:
        assert_merged_matches_peft(ours, theirs, batch, config)
        return
    torch.testing.assert_close(
        loss_and_grads(ours, batch), loss_and_grads(theirs, batch), atol=1e-5, rtol=1e-5
    )
    compared = 0
    for name, layer in adapter_layers(ours):
        ref = theirs.get_submodule("base_model.model." + name)
        for mine, other in ((layer.lora_A, ref.lora_A["default"]), (layer.lora_B, ref.lora_B["default"])):
            torch.testing.assert_close(mine.weight.grad, other.weight.grad, atol=1e-5, rtol=1e-4)
            compared += 1
    assert compared > 0


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora"])
def test_principal_inits_match_peft(init):
    ours = build_t5("t5-tiny")
    theirs = copy.deepcopy(ours)
    config = LoRAConfig(r=4, alpha=8, target_modules=("q", "v", "wi"), init=init)
    torch.manual_seed(7)  # svd_lowrank draws a random projection: same seed, same draw
    inject(ours, config)
    torch.manual_seed(7)
    theirs = peft_lora(theirs, config)
    for name, layer in adapter_layers(ours):
        ref = theirs.get_submodule("base_model.model." + name)
        torch.testing.assert_close(layer.lora_A.weight, ref.lora_A["default"].weight, atol=1e-4, rtol=0)
        torch.testing.assert_close(layer.lora_B.weight, ref.lora_B["default"].weight, atol=1e-4, rtol=0)
        torch.testing.assert_close(layer.base.weight, ref.get_base_layer().weight, atol=1e-4, rtol=0)


@pytest.mark.parametrize("input_grad", [True, False])
def test_the_fused_dropout_path_equals_the_equation_with_the_same_mask(input_grad):
    """Training with dropout on the CPU: y = W x + b + s B A (m * x / (1 - p)), m the mask drawn
    by position; output and every gradient against autograd on the equation with that mask."""
    from peftcore.kernels.dropout import dropped_positions

    torch.manual_seed(0)
    p = 0.2
    layer = LoRALinear(nn.Linear(20, 12), r=3, alpha=5.0, dropout=p).train()
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(2, 4, 20, requires_grad=input_grad)
    assert layer.uses_fused_kernel(x)
    torch.manual_seed(7)
    out = layer(x)
    torch.manual_seed(7)
    mask = torch.ones(x.numel())
    mask[dropped_positions(x.numel(), p)] = 0.0
    assert 0 < mask.sum() < x.numel()
    weights = torch.linspace(-1, 1, 12)
    (out * weights).sum().backward()
    fused = (layer.lora_A.weight.grad, layer.lora_B.weight.grad, x.grad)
    layer.zero_grad()
    x.grad = None
    dropped = x * mask.view(x.shape) / (1 - p)
    expected = layer.base(x) + layer.scale * nn.functional.linear(
        nn.functional.linear(dropped, layer.lora_A.weight), layer.lora_B.weight
    )
    (expected * weights).sum().backward()
    torch.testing.assert_close(out, expected)
    for got, want in zip(fused, (layer.lora_A.weight.grad, layer.lora_B.weight.grad, x.grad)):
        assert (got is None) == (want is None)
        if want is not None:
            torch.testing.assert_close(got, want)
    assert not torch.allclose(out, layer.eval()(x))  # the mask did something

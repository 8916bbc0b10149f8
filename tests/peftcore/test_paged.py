"""PagedAdamW against torch.optim.AdamW (single-tensor), with and without paging."""

from __future__ import annotations

import io

import pytest
import torch

from peftcore.paged import PagedAdamW

SHAPES = [(16, 8), (8,), (4, 4, 3), (32,), (5, 7)]
STATE_BYTES = [2 * 4 * torch.Size(s).numel() for s in SHAPES]  # exp_avg + exp_avg_sq, fp32
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def make_params(device: str = "cpu") -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(device)) for s in SHAPES]


def train(optimizer, params, steps: int, start: int = 0) -> None:
    """Gradients of sum((p - target_i)^2) plus step-dependent noise, so the path depends on the update."""
    for step in range(start, start + steps):
        g = torch.Generator().manual_seed(1000 + step)
        for i, p in enumerate(params):
            target = torch.full(p.shape, float(i) - 1.0)
            noise = torch.randn(p.shape, generator=g)
            p.grad = (2 * (p.detach().cpu() - target) + noise).to(p.device)
        optimizer.step()


def groups(params, spec):
    """spec: None (one group) or a list of (indices, overrides)."""
    if spec is None:
        return params
    return [{"params": [params[i] for i in idx], **overrides} for idx, overrides in spec]


GROUPS = [
    (None, dict(weight_decay=0.01)),
    (None, dict(weight_decay=0.0)),
    (None, dict(lr=3e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)),
    (
        [
            ([0, 1], dict(lr=1e-2)),
            ([2], dict(weight_decay=0.0, betas=(0.5, 0.9))),
            ([3, 4], dict(lr=5e-3, eps=1e-5)),
        ],
        dict(weight_decay=0.02),
    ),
]


def assert_same_trajectory(make_ours, kwargs, spec, steps=20, device="cpu"):
    ours_params, ref_params = make_params(device), make_params(device)
    ours = make_ours(groups(ours_params, spec), **kwargs)
    ref = torch.optim.AdamW(groups(ref_params, spec), foreach=False, **kwargs)
    for step in range(steps):
        train(ours, ours_params, 1, start=step)
        train(ref, ref_params, 1, start=step)
        for a, b in zip(ours_params, ref_params):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
            assert torch.equal(a, b)  # same operations in the same order: bit for bit
    return ours, ref


@pytest.mark.parametrize("spec,kwargs", GROUPS)
def test_matches_adamw_without_paging(spec, kwargs):
    opt, _ = assert_same_trajectory(PagedAdamW, kwargs, spec)
    assert opt.pool.page_ins == 0 and opt.pool.evictions == 0


@pytest.mark.parametrize("spec,kwargs", GROUPS)
def test_matches_adamw_with_paging_under_a_budget(spec, kwargs):
    budget = max(STATE_BYTES) + min(STATE_BYTES)  # far less than the 2,000-odd bytes of all states

    def make(params, **kw):
        return PagedAdamW(params, gpu_budget_bytes=budget, simulate_paging_on_cpu=True, **kw)

    opt, ref = assert_same_trajectory(make, kwargs, spec)
    pool = opt.pool
    assert budget < sum(STATE_BYTES)
    assert pool.page_ins > 2 * len(SHAPES) and pool.evictions > 2 * len(SHAPES) and pool.prefetches > 0
    assert pool.peak_resident_bytes <= budget
    # The states written back to their home copies are AdamW's states.
    ours_state, ref_state = opt.state_dict()["state"], ref.state_dict()["state"]
    for k, s in ref_state.items():
        assert all(torch.equal(ours_state[k][name], s[name]) for name in ("step", "exp_avg", "exp_avg_sq"))


def test_a_budget_smaller_than_one_page_still_trains_correctly():
    def make(params, **kw):
        return PagedAdamW(params, gpu_budget_bytes=16, simulate_paging_on_cpu=True, **kw)

    opt, _ = assert_same_trajectory(make, dict(weight_decay=0.01), None, steps=5)
    assert opt.pool.page_ins == 5 * len(SHAPES) and opt.pool.prefetches == 0


def test_budget_without_a_gpu_is_plain_adamw():
    opt, _ = assert_same_trajectory(
        lambda p, **kw: PagedAdamW(p, gpu_budget_bytes=64, **kw), {}, None, steps=3
    )
    assert opt.pool.page_ins == 0  # CPU parameters are not paged unless simulated


def save_and_load(state_dict: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer)


@pytest.mark.parametrize("budget", [None, 1200])
def test_resumed_run_continues_identically(budget):
    kwargs = dict(lr=1e-2, weight_decay=0.05, gpu_budget_bytes=budget, simulate_paging_on_cpu=True)
    straight = make_params()
    opt = PagedAdamW(straight, **kwargs)
    train(opt, straight, 20)

    first = make_params()
    opt1 = PagedAdamW(first, **kwargs)
    train(opt1, first, 10)
    saved = save_and_load(opt1.state_dict())
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in first]
    opt2 = PagedAdamW(resumed, **kwargs)
    opt2.load_state_dict(saved)
    train(opt2, resumed, 10, start=10)
    for a, b in zip(resumed, straight):
        assert torch.equal(a, b)
    if budget is not None:
        assert opt2.pool.page_ins > 0 and opt2.pool.peak_resident_bytes <= budget


def test_state_dict_is_interchangeable_with_adamw():
    params_a, params_b = make_params(), make_params()
    ours = PagedAdamW(params_a, gpu_budget_bytes=1200, simulate_paging_on_cpu=True)
    ref = torch.optim.AdamW(params_b, foreach=False)
    train(ours, params_a, 5)
    train(ref, params_b, 5)
    ours_state, ref_state = ours.state_dict(), ref.state_dict()
    assert ours_state["param_groups"][0]["lr"] == ref_state["param_groups"][0]["lr"]
    for k, s in ref_state["state"].items():
        assert set(ours_state["state"][k]) == set(s)
        for name in s:
            assert torch.equal(ours_state["state"][k][name], s[name])
    # AdamW's state continues in PagedAdamW, and the other way round.
    crossed_a, crossed_b = [torch.nn.Parameter(p.detach().clone()) for p in params_b], make_params()
    with torch.no_grad():
        for dst, src in zip(crossed_b, params_a):
            dst.copy_(src)
    ours2 = PagedAdamW(crossed_a, gpu_budget_bytes=1200, simulate_paging_on_cpu=True)
    ours2.load_state_dict(save_and_load(ref.state_dict()))
    ref2 = torch.optim.AdamW(crossed_b, foreach=False)
    ref2.load_state_dict(save_and_load(ours.state_dict()))
    train(ours2, crossed_a, 5, start=5)
    train(ref2, crossed_b, 5, start=5)
    for a, b in zip(crossed_a, crossed_b):
        assert torch.equal(a, b)


def test_params_without_grad_are_left_alone():
    params = make_params()
    opt = PagedAdamW(params, gpu_budget_bytes=300, simulate_paging_on_cpu=True)
    before = params[1].detach().clone()
    params[0].grad = torch.ones_like(params[0])
    opt.step()
    assert torch.equal(params[1], before) and params[1] not in opt.state


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(lr=-1e-3), "lr"),
        (dict(eps=-1e-8), "eps"),
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(betas=(1.0, 0.999)), "betas"),
        (dict(betas=(0.9, -0.1)), "betas"),
        (dict(betas=(0.9,)), "betas"),
        (dict(gpu_budget_bytes=-1), "gpu_budget_bytes"),
        (dict(gpu_budget_bytes=1.5), "gpu_budget_bytes"),
    ],
)
def test_bad_hyperparameters_are_refused(kwargs, field):
    with pytest.raises(ValueError, match=rf"PagedAdamW: {field} must be .*got"):
        PagedAdamW(make_params(), **kwargs)


def test_bad_param_group_is_refused():
    params = make_params()
    with pytest.raises(ValueError, match="lr must be a number >= 0, got -0.5"):
        PagedAdamW([{"params": params[:2]}, {"params": params[2:], "lr": -0.5}])


# ---------------------------------------------------------------- CUDA


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("spec,kwargs", GROUPS[::3])
def test_cuda_paging_matches_adamw(spec, kwargs):
    budget = max(STATE_BYTES) + min(STATE_BYTES)
    opt, _ = assert_same_trajectory(
        lambda p, **kw: PagedAdamW(p, gpu_budget_bytes=budget, **kw), kwargs, spec, device="cuda"
    )
    pool = opt.pool
    assert pool.page_ins > 0 and pool.evictions > 0 and pool.prefetches > 0
    assert pool.peak_resident_bytes <= budget
    assert all(page.home.is_pinned() and page.home.device.type == "cpu" for page in pool.pages.values())


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("spec,kwargs", GROUPS)
def test_cuda_without_a_budget_matches_adamw(spec, kwargs):
    """No budget: the multi-tensor update on the GPU, bit for bit torch's single-tensor AdamW."""
    opt, _ = assert_same_trajectory(PagedAdamW, kwargs, spec, device="cuda")
    assert opt.pool.page_ins == 0


@pytest.mark.gpu
@requires_cuda
def test_cuda_states_beyond_the_budget_stay_off_the_gpu():
    params = [
        torch.nn.Parameter(torch.randn(1024, 1024, device="cuda")) for _ in range(4)
    ]  # 8 MiB of state each
    budget = 2 * 8 * 2**20
    opt = PagedAdamW(params, gpu_budget_bytes=budget)
    for p in params:
        p.grad = torch.randn_like(p)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    opt.step()
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() - base <= budget
    assert opt.pool.resident_bytes <= budget < 4 * 8 * 2**20


@pytest.mark.gpu
@requires_cuda
def test_cuda_resume_continues_identically():
    kwargs = dict(lr=1e-2, gpu_budget_bytes=600)
    straight = make_params("cuda")
    opt = PagedAdamW(straight, **kwargs)
    train(opt, straight, 20)
    first = make_params("cuda")
    opt1 = PagedAdamW(first, **kwargs)
    train(opt1, first, 10)
    saved = save_and_load(opt1.state_dict())
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in first]
    opt2 = PagedAdamW(resumed, **kwargs)
    opt2.load_state_dict(saved)
    train(opt2, resumed, 10, start=10)
    for a, b in zip(resumed, straight):
        assert torch.equal(a, b)


def qlora_t5_base_peak(make_optimizer) -> tuple[int, int]:
    """Peak CUDA memory of the third step of a QLoRA t5-base step (batch 8 x 512 / 128), and the
    bytes of AdamW state (exp_avg + exp_avg_sq) that its trainable parameters need."""
    from helpers import build_t5, t5_batch

    import peftcore

    model = build_t5("t5-base", device="cuda").train()
    peftcore.quantize(model, peftcore.NF4Config())
    peftcore.inject(model, peftcore.LoRAConfig(r=16, alpha=32, target_modules=("q", "v")))
    params = [p for p in model.parameters() if p.requires_grad]
    state_bytes = sum(2 * p.numel() * p.element_size() for p in params)
    optimizer = make_optimizer(params)
    batch = {k: v.cuda() for k, v in t5_batch(8, 512, 128).items()}
    for step in range(3):  # the states exist from the first step on; measure a step in steady state
        if step == 2:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del model, optimizer, params
    torch.cuda.empty_cache()
    return peak, state_bytes


@pytest.mark.gpu
@requires_cuda
def test_cuda_paging_lowers_the_peak_of_a_qlora_t5_base_step_by_the_states():
    budget = 2**20  # 1 MiB of the 13.5 MiB of state may stay on the GPU
    adamw_peak, state_bytes = qlora_t5_base_peak(lambda p: torch.optim.AdamW(p, lr=1e-4))
    paged_peak, _ = qlora_t5_base_peak(lambda p: PagedAdamW(p, lr=1e-4, gpu_budget_bytes=budget))
    saved = adamw_peak - paged_peak
    print(
        f"peak with AdamW {adamw_peak / 2**20:.1f} MiB, with PagedAdamW {paged_peak / 2**20:.1f} MiB: "
        f"{saved / 2**20:.2f} MiB less; the states are {state_bytes / 2**20:.2f} MiB, the budget {budget / 2**20} MiB"
    )
    assert 0.9 * (state_bytes - budget) <= saved <= 1.1 * state_bytes

"""PagedAdamW: AdamW whose states live in a page pool with a device-memory budget (QLoRA's paged optimizers).

The update is exactly ``torch.optim.AdamW``'s default single-tensor one (Loshchilov & Hutter, 2019),
with the operations in the same order so that trajectories match bit for bit::

    t     <- t + 1
    theta <- theta * (1 - lr * wd)                              decoupled weight decay
    m     <- lerp(m, g, 1 - beta1)                              = beta1 m + (1 - beta1) g
    v     <- beta2 v + (1 - beta2) g * g
    theta <- theta - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

Paging (Dettmers et al., 2023, section 3). Each parameter's states ``(m, v)`` form one page, a
``(2, *shape)`` tensor. With ``gpu_budget_bytes`` set, a parameter on a GPU keeps its page's home
copy in pinned CPU memory; at most ``gpu_budget_bytes`` of pages are resident on the GPU at once.
Before a parameter is updated its page is paged in (if it is not already resident), evicting the
least-recently-used pages (written back to their home copy) to stay within the budget; while it is
updated, the next parameter's page is prefetched on a side CUDA stream. A page larger than the
whole budget is still paged in, alone. bitsandbytes pages through CUDA unified memory instead; here
the paging is explicit so that it can be counted and tested.

Without a budget, or for parameters that are not on a GPU, the page's home is the parameter's own
device and the optimizer is an ordinary AdamW; those states are updated with PyTorch's multi-tensor
(``_foreach``) operations, one set of launches per parameter group, in the same order as above (so
the same numbers: the tests compare bit for bit), where paged states are updated one page at a time. ``simulate_paging_on_cpu=True`` pages CPU
parameters as if CPU memory were a budgeted device (a separate home copy, real copies in and out),
so the paging logic runs, and can be counted, on a machine without a GPU.

``optimizer.state[p]`` holds ``step`` and the home copies (``exp_avg``, ``exp_avg_sq``, views of the
page), so ``state_dict()`` has torch.optim.AdamW's layout; it first writes resident pages back.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass
class _Page:
    home: Tensor  # (2, *shape): exp_avg, exp_avg_sq; pinned host memory when paged
    device: torch.device  # where the parameter, and so the update, lives
    paged: bool
    resident: Tensor | None = None  # the copy on `device` while paged in
    ready: Any | None = None  # a CUDA event: the prefetch copy on the side stream is done
    dirty: bool = False  # resident copy newer than home

    @property
    def nbytes(self) -> int:
        return self.home.numel() * self.home.element_size()


class PagePool:
    """Optimizer-state pages with a budget of resident bytes and least-recently-used eviction.

    Counters (for tests and benchmarks): ``page_ins`` (including prefetches), ``prefetches``,
    ``evictions``, ``resident_bytes`` and ``peak_resident_bytes``.
    """

    def __init__(self, budget_bytes: int | None, simulate_on_cpu: bool = False) -> None:
        self.budget_bytes = budget_bytes
        self.simulate_on_cpu = simulate_on_cpu
        self.pages: dict[Tensor, _Page] = {}
        self._lru: OrderedDict[Tensor, None] = OrderedDict()  # resident paged pages, oldest first
        self._side_streams: dict[torch.device, Any] = {}
        self.page_ins = self.prefetches = self.evictions = 0
        self.resident_bytes = self.peak_resident_bytes = 0

    def _pages_on(self, device: torch.device) -> bool:
        if self.budget_bytes is None:
            return False
        return device.type == "cuda" or (self.simulate_on_cpu and device.type == "cpu")

    def add(self, key: Tensor, init: Tensor | None = None) -> Tensor:
        """Register the page of parameter ``key``: a ``(2, *key.shape)`` tensor of ``key``'s dtype,
        zeros or a copy of ``init``. Returns its home copy."""
        shape, paged = (2, *key.shape), self._pages_on(key.device)
        if paged:  # home in host memory (pinned, for asynchronous copies, when the device is a GPU)
            home = torch.zeros(shape, dtype=key.dtype, pin_memory=key.device.type == "cuda")
        else:
            home = torch.zeros(shape, dtype=key.dtype, device=key.device)
        if init is not None:
            home.copy_(init)
        self.pages[key] = _Page(home, key.device, paged)
        return home

    def fetch(self, key: Tensor) -> Tensor:
        """The page of ``key`` on its parameter's device, paged in if needed; marked as modified."""
        page = self.pages[key]
        if not page.paged:
            return page.home
        if page.resident is None:
            self._page_in(key, page, prefetch=False)
        elif page.ready is not None:  # prefetched: wait for the side stream, then hand it to this one
            stream = torch.cuda.current_stream(page.device)
            stream.wait_event(page.ready)
            page.resident.record_stream(stream)
            page.ready = None
        self._lru.move_to_end(key)
        page.dirty = True
        return page.resident

    def prefetch(self, key: Tensor, protect: Tensor) -> None:
        """Start paging in ``key``'s page if it fits without evicting ``protect`` (the page in use)."""
        page = self.pages[key]
        if not page.paged or page.resident is not None:
            return
        evictable = sum(self.pages[k].nbytes for k in self._lru if k is not protect)
        if self.resident_bytes - evictable + page.nbytes > self.budget_bytes:
            return  # it will be paged in when needed
        self._page_in(key, page, prefetch=True, protect=protect)

    def _page_in(self, key: Tensor, page: _Page, prefetch: bool, protect: Tensor | None = None) -> None:
        self._make_room(page.nbytes, keep=(key, protect))
        if page.device.type == "cuda" and prefetch:
            side = self._side_streams.setdefault(page.device, torch.cuda.Stream(page.device))
            side.wait_stream(torch.cuda.current_stream(page.device))
            with torch.cuda.stream(side):
                page.resident = torch.empty(page.home.shape, dtype=page.home.dtype, device=page.device)
                page.resident.copy_(page.home, non_blocking=True)
                page.ready = torch.cuda.Event()
                page.ready.record(side)
            self.prefetches += 1
        else:  # on the current stream (or plain CPU copies when simulating)
            page.resident = torch.empty(page.home.shape, dtype=page.home.dtype, device=page.device)
            page.resident.copy_(page.home, non_blocking=page.home.is_pinned())
            self.prefetches += prefetch
        self._lru[key] = None
        self.page_ins += 1
        self.resident_bytes += page.nbytes
        self.peak_resident_bytes = max(self.peak_resident_bytes, self.resident_bytes)

    def _make_room(self, nbytes: int, keep: tuple[Tensor | None, ...]) -> None:
        while self.resident_bytes + nbytes > self.budget_bytes:
            victim = next((k for k in self._lru if all(k is not kept for kept in keep)), None)
            if victim is None:
                return  # only pages in use are left: a page larger than the budget goes in alone
            self._evict(victim)

    def _evict(self, key: Tensor) -> None:
        page = self.pages[key]
        if page.ready is not None:  # a prefetch nobody used yet: let its copy finish first
            page.ready.synchronize()
        if page.dirty:
            page.home.copy_(page.resident)  # blocking: home is final before anyone reads it again
        page.resident = page.ready = None
        page.dirty = False
        del self._lru[key]
        self.resident_bytes -= page.nbytes
        self.evictions += 1

    def flush(self) -> None:
        """Write every modified resident page back to its home copy (pages stay resident)."""
        for key in self._lru:
            page = self.pages[key]
            if page.dirty:
                page.home.copy_(page.resident)
                page.dirty = False


def _check_hyperparameters(group: dict) -> None:
    def number(value: object) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    lr, betas, eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    if not number(lr) or not lr >= 0:
        raise ValueError(f"PagedAdamW: lr must be a number >= 0, got {lr!r}")
    if not number(eps) or not eps >= 0:
        raise ValueError(f"PagedAdamW: eps must be a number >= 0, got {eps!r}")
    if not number(wd) or not wd >= 0:
        raise ValueError(f"PagedAdamW: weight_decay must be a number >= 0, got {wd!r}")
    if not (
        isinstance(betas, (tuple, list)) and len(betas) == 2 and all(number(b) and 0 <= b < 1 for b in betas)
    ):
        raise ValueError(f"PagedAdamW: betas must be two numbers in [0, 1), got {betas!r}")


class PagedAdamW(torch.optim.Optimizer):
    """AdamW (torch.optim.AdamW's math) with optimizer states in a :class:`PagePool`.

    Args:
        params: parameters or parameter groups, as for any torch optimizer.
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW`` (its defaults).
        gpu_budget_bytes: bytes of optimizer state allowed on the GPU at once; the rest waits in
            pinned CPU memory. None: all states stay on the parameters' device (plain AdamW).
        simulate_paging_on_cpu: page CPU parameters too, treating CPU memory as the budgeted
            device (for tests and measurements without a GPU).
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        gpu_budget_bytes: int | None = None,
        *,
        simulate_paging_on_cpu: bool = False,
    ) -> None:
        if gpu_budget_bytes is not None and (
            isinstance(gpu_budget_bytes, bool)
            or not isinstance(gpu_budget_bytes, int)
            or gpu_budget_bytes < 0
        ):
            raise ValueError(
                f"PagedAdamW: gpu_budget_bytes must be None or an integer >= 0, got {gpu_budget_bytes!r}"
            )
        betas = tuple(betas) if isinstance(betas, list) else betas  # from YAML
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        _check_hyperparameters(defaults)
        self.pool = PagePool(gpu_budget_bytes, simulate_paging_on_cpu)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        _check_hyperparameters({**self.defaults, **param_group})
        super().add_param_group(param_group)

    def _new_state(self, p: Tensor) -> dict:
        home = self.pool.add(p)
        # `step` as torch.optim.AdamW keeps it (a float32 CPU scalar), so state dicts are interchangeable.
        return {"step": torch.tensor(0.0, dtype=torch.float32), "exp_avg": home[0], "exp_avg_sq": home[1]}

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = [(group, p) for group in self.param_groups for p in group["params"] if p.grad is not None]
        for _, p in work:
            if p.grad.is_sparse:
                raise RuntimeError("PagedAdamW does not support sparse gradients")
            if not self.state[p]:
                self.state[p] = self._new_state(p)
        paged = [(group, p) for group, p in work if self.pool.pages[p].paged]
        for i, (group, p) in enumerate(paged):
            page = self.pool.fetch(p)
            if i + 1 < len(paged):  # overlap the next page-in with this update
                self.pool.prefetch(paged[i + 1][1], protect=p)
            self._adamw(p, p.grad, page[0], page[1], self.state[p]["step"], group)
        self._adamw_foreach([(group, p) for group, p in work if not self.pool.pages[p].paged])
        return loss

    def _adamw_foreach(self, work: list[tuple[dict, Tensor]]) -> None:
        """The states that live beside their parameters: one multi-tensor update per parameter group,
        device and step count (a handful of kernel launches instead of eight per tensor), with the
        single-tensor update's operations in the same order, so the numbers are the same."""
        batches: dict[tuple[int, torch.device, float], tuple[dict, list[Tensor]]] = {}
        for group, p in work:
            key = (id(group), p.device, float(self.state[p]["step"]))
            batches.setdefault(key, (group, []))[1].append(p)
        for (_, _, step), (group, params) in batches.items():
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            states = [self.state[p] for p in params]
            grads = [p.grad for p in params]
            exp_avgs, exp_avg_sqs = [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]
            for state in states:
                state["step"] += 1
            step += 1
            if wd != 0:
                torch._foreach_mul_(params, 1 - lr * wd)
            torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
            torch._foreach_mul_(exp_avg_sqs, beta2)
            torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
            denom = torch._foreach_sqrt(exp_avg_sqs)
            torch._foreach_div_(denom, (1 - beta2**step) ** 0.5)
            torch._foreach_add_(denom, eps)
            torch._foreach_addcdiv_(params, exp_avgs, denom, value=-lr / (1 - beta1**step))

    @staticmethod
    def _adamw(
        p: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step_t: Tensor, group: dict
    ) -> None:
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        step_t += 1
        if wd != 0:
            p.mul_(1 - lr * wd)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step = step_t.item()
        bias_correction2_sqrt = (1 - beta2**step) ** 0.5
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
        p.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1**step))

    def state_dict(self) -> dict:
        self.pool.flush()
        return super().state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a PagedAdamW or torch.optim.AdamW state dict; states are re-homed into a fresh pool."""
        super().load_state_dict(state_dict)  # casts exp_avg / exp_avg_sq to each parameter's device and dtype
        self.pool = PagePool(self.pool.budget_bytes, self.pool.simulate_on_cpu)
        for p, state in self.state.items():
            if "exp_avg" in state:
                home = self.pool.add(p, init=torch.stack((state["exp_avg"], state["exp_avg_sq"])))
                state["exp_avg"], state["exp_avg_sq"] = home[0], home[1]

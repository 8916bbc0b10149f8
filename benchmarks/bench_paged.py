"""Paged optimizers on a GPU: peftcore's PagedAdamW next to bitsandbytes' PagedAdamW and torch's AdamW.

    python -m benchmarks.bench_paged [--repeats 30] [--budget-mib 1]

On the trainable tensors of QLoRA on t5-base (NF4 base, LoRA r=16 on q,v: 144 tensors, 1.77 M
parameters) it measures, in one run:

* the optimizer step alone, the optimizers taking turns on their own copies of the same tensors and
  gradients: ours without a budget (an ordinary AdamW), ours paging with ``--budget-mib`` of state on
  the GPU, bitsandbytes' 32-bit PagedAdamW (CUDA unified memory), and torch.optim.AdamW (its default
  multi-tensor implementation);
* the peak GPU memory of a whole QLoRA training step (batch 8 x 512 / 128) with each optimizer,
  which shows what paging the states out of device memory saves.

Needs a CUDA GPU. Results go to ``benchmarks/results/bench_paged_<device>.json``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import transformers

import peftcore
from benchmarks.common import machine, print_table, ratio, summary, time_interleaved, write_result
from peftcore.t5 import t5_config


def qlora_t5_base(device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.T5ForConditionalGeneration(t5_config("t5-base"))
    peftcore.quantize(model, peftcore.NF4Config())
    peftcore.inject(model, peftcore.LoRAConfig(r=16, alpha=32, target_modules=("q", "v")))
    return model.train()


def optimizers(budget: int) -> dict[str, Callable]:
    import bitsandbytes as bnb

    return {
        "peftcore PagedAdamW, no budget": lambda p: peftcore.PagedAdamW(p, lr=1e-4),
        f"peftcore PagedAdamW, {budget / 2**20:g} MiB budget": lambda p: peftcore.PagedAdamW(
            p, lr=1e-4, gpu_budget_bytes=budget
        ),
        "bitsandbytes PagedAdamW (32-bit)": lambda p: bnb.optim.PagedAdamW(p, lr=1e-4),
        "torch AdamW": lambda p: torch.optim.AdamW(p, lr=1e-4),
    }


def step_times(
    shapes: list[torch.Size], makers: dict[str, Callable], repeats: int, device: torch.device
) -> dict:
    g = torch.Generator(device).manual_seed(0)
    grads = [torch.randn(s, device=device, generator=g) for s in shapes]
    steps = {}
    for name, make in makers.items():
        params = [torch.nn.Parameter(torch.zeros(s, device=device)) for s in shapes]
        for p, grad in zip(params, grads):
            p.grad = grad.clone()
        steps[name] = make(params).step
    return time_interleaved(steps, repeats, device, warmup=3)


def peak_step_memory(make: Callable, device: torch.device) -> int:
    model = qlora_t5_base(device)
    optimizer = make([p for p in model.parameters() if p.requires_grad])
    g = torch.Generator().manual_seed(1)
    batch = {
        "input_ids": torch.randint(2, 32000, (8, 512), generator=g).to(device),
        "labels": torch.randint(2, 32000, (8, 128), generator=g).to(device),
    }
    for step in range(3):
        if step == 2:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del model, optimizer
    torch.cuda.empty_cache()
    return peak


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--budget-mib", type=float, default=1.0)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit(
            "bench_paged needs a CUDA GPU: paging moves optimizer state between GPU and host memory"
        )
    device = torch.device("cuda", torch.cuda.current_device())
    budget = int(args.budget_mib * 2**20)
    model = qlora_t5_base(device)
    shapes = [p.shape for p in model.parameters() if p.requires_grad]
    state_bytes = sum(2 * 4 * s.numel() for s in shapes)
    del model
    torch.cuda.empty_cache()
    makers = optimizers(budget)
    times = step_times(shapes, makers, args.repeats, device)
    bnb_name = "bitsandbytes PagedAdamW (32-bit)"
    peaks = {name: peak_step_memory(make, device) for name, make in makers.items()}
    rows = [
        dict(
            optimizer=name,
            step_ms=summary(times[name]),
            ratio_to_bitsandbytes=ratio(times[name], times[bnb_name]),
            peak_step_mib=round(peaks[name] / 2**20, 2),
        )
        for name in makers
    ]
    result = dict(
        benchmark="paged AdamW on QLoRA t5-base (LoRA r=16 q,v)",
        machine=machine(device),
        tensors=len(shapes),
        parameters=sum(s.numel() for s in shapes),
        state_mib=round(state_bytes / 2**20, 2),
        budget_mib=args.budget_mib,
        repeats=args.repeats,
        results=rows,
    )
    path = write_result("bench_paged", device, result)
    print_table(
        ("optimizer", "step ms", "ratio to bnb [range]", "peak MiB of a QLoRA step"),
        [
            (
                r["optimizer"],
                r["step_ms"]["median"],
                f"{r['ratio_to_bitsandbytes']['median']} [{r['ratio_to_bitsandbytes']['low']}, "
                f"{r['ratio_to_bitsandbytes']['high']}]",
                r["peak_step_mib"],
            )
            for r in rows
        ],
        f"{len(shapes)} tensors, {result['state_mib']} MiB of AdamW state, on {result['machine']['device']}",
    )
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()

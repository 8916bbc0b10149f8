"""NF4 quantize / dequantize speed: peftcore.nf4 next to bitsandbytes, on the current device.

    python -m benchmarks.bench_nf4 [--repeats 20] [--device cuda] [--threads 1]

For t5-base-sized weights (768x768 attention, 3072x768 feed-forward) it times, in one run:
quantization of an fp32 weight with double quantization (QLoRA's setting) and dequantization to
bf16 (what every forward pass does), median over ``--repeats`` runs after a warm-up (and the
fastest run, which shared machines disturb least). It checks that both libraries produce identical
results, prints a table (ratio = ours / bitsandbytes, below 1 is faster) and writes JSON to
``benchmarks/results/bench_nf4_<device>.json``. On CUDA it also times ``torch.compile(dequantize_nf4)``
against bitsandbytes' dequantization kernel.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from peftcore.nf4 import dequantize_nf4, quantize_nf4

SHAPES = {"attention 768x768": (768, 768), "feed-forward 3072x768": (3072, 768)}
RESULTS = Path(__file__).resolve().parent / "results"


def time_ms(fns: list[Callable[[], object]], repeats: int, device: torch.device) -> list[list[float]]:
    """Wall times of each function in milliseconds, after two warm-up calls. The functions run in
    turn within each repeat, so that other load on the machine hits them alike."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for fn in fns:
        fn(), fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, times):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            out.append((time.perf_counter() - start) * 1e3)
    return times


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        name = "cuda-" + torch.cuda.get_device_name(device)
    else:
        name = f"cpu-{torch.get_num_threads()}threads"
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()


def bench_shape(label: str, shape: tuple[int, int], device: torch.device, repeats: int) -> list[dict]:
    import bitsandbytes.functional as BF

    weight = 0.02 * torch.randn(shape, device=device, generator=torch.Generator(device).manual_seed(0))
    ours = quantize_nf4(weight, 64, double_quant=True)
    packed, theirs = BF.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=True)
    theirs.dtype = torch.bfloat16
    same_state = torch.equal(ours.packed, packed.view(-1)) and torch.equal(ours.absmax, theirs.absmax)
    same_weight = torch.equal(dequantize_nf4(ours, torch.bfloat16), BF.dequantize_4bit(packed, theirs))

    cases = [
        (
            "quantize fp32 -> nf4 (+double quant)",
            lambda: quantize_nf4(weight, 64, double_quant=True),
            lambda: BF.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=True),
            same_state,
        ),
        (
            "dequantize nf4 -> bf16",
            lambda: dequantize_nf4(ours, torch.bfloat16),
            lambda: BF.dequantize_4bit(packed, theirs),
            same_weight,
        ),
    ]
    if device.type == "cuda":
        compiled = torch.compile(dequantize_nf4)
        same_compiled = torch.equal(compiled(ours, torch.bfloat16), BF.dequantize_4bit(packed, theirs))
        cases.append(
            (
                "dequantize nf4 -> bf16, torch.compile",
                lambda: compiled(ours, torch.bfloat16),
                lambda: BF.dequantize_4bit(packed, theirs),
                same_compiled,
            )
        )
    rows = []
    for op, fn_ours, fn_theirs, identical in cases:
        times_ours, times_theirs = time_ms([fn_ours, fn_theirs], repeats, device)
        ours_ms, theirs_ms = statistics.median(times_ours), statistics.median(times_theirs)
        rows.append(
            dict(
                op=op,
                weight=label,
                ours_ms=round(ours_ms, 4),
                bitsandbytes_ms=round(theirs_ms, 4),
                ratio=round(ours_ms / theirs_ms, 3),
                # the fastest run is the least disturbed by other work on a shared machine
                ours_min_ms=round(min(times_ours), 4),
                bitsandbytes_min_ms=round(min(times_theirs), 4),
                ratio_of_min=round(min(times_ours) / min(times_theirs), 3),
                identical=bool(identical),
            )
        )
    return rows


def print_table(rows: list[dict], title: str) -> None:
    header = ("operation", "weight", "peftcore ms", "bnb ms", "ratio", "ratio of fastest runs", "identical")
    lines = [
        (r["op"], r["weight"], f"{r['ours_ms']:.3f}", f"{r['bitsandbytes_ms']:.3f}", f"{r['ratio']:.2f}",
         f"{r['ratio_of_min']:.2f}", "yes" if r["identical"] else "NO")
        for r in rows
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines)]
    print(title)
    for i, line in enumerate([header, *lines]):
        print("| " + " | ".join(str(x).ljust(w) for x, w in zip(line, widths)) + " |")
        if i == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per measurement (median is reported)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())

    import bitsandbytes

    rows = [row for label, shape in SHAPES.items() for row in bench_shape(label, shape, device, args.repeats)]
    name = device_name(device)
    result = dict(
        benchmark="nf4 quantize/dequantize, blocksize 64, double quantization",
        device=name,
        cpu=platform.processor() or platform.machine(),
        torch=torch.__version__,
        bitsandbytes=bitsandbytes.__version__,
        threads=torch.get_num_threads(),
        load_average=[round(x, 2) for x in os.getloadavg()],  # other work on the machine skews CPU timings
        repeats=args.repeats,
        results=rows,
    )
    print_table(rows, f"NF4 on {name} (torch {torch.__version__}, bitsandbytes {bitsandbytes.__version__}, "
                      f"median of {args.repeats})")
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"bench_nf4_{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path.relative_to(RESULTS.parent.parent)}")
    return result


if __name__ == "__main__":
    main()

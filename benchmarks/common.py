"""What every benchmark shares: machine facts, interleaved timing, ratios with their spread, JSON out.

Timing rule: ours and the reference run in turn within each repeat (ours, theirs, ours, theirs...),
so that whatever else disturbs the machine hits both alike. A ratio is ours / reference of the
medians; its spread is the range of the per-repeat ratios. When that range contains 1 the result
is a tie, whatever the median says.
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import json
import os
import platform
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from peftcore.files import write_atomically

RESULTS = Path(__file__).resolve().parent / "results"


def parser(doc: str) -> argparse.ArgumentParser:
    """A script's argument parser, with the options every benchmark takes: --device and --threads."""
    made = argparse.ArgumentParser(description=doc.splitlines()[0])
    made.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    made.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    return made


def parse(made: argparse.ArgumentParser, argv: list[str] | None) -> tuple[argparse.Namespace, torch.device]:
    """The arguments, with --threads applied, and the device."""
    args = made.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    return args, torch.device(args.device)


def device_tag(device: torch.device) -> str:
    """``cuda-nvidia-h100-80gb-hbm3`` or ``cpu-2threads``: the suffix of a result file's name."""
    if device.type == "cuda":
        name = "cuda-" + torch.cuda.get_device_name(device)
    else:
        name = f"cpu-{torch.get_num_threads()}threads"
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine(device: torch.device) -> dict:
    """Where and with what a result was measured."""
    info = dict(
        device=device_tag(device),
        cpu=platform.processor() or platform.machine(),
        cpu_count=os.cpu_count(),
        threads=torch.get_num_threads(),
        load_average=[round(x, 2) for x in os.getloadavg()],
        python=platform.python_version(),
        versions={
            p: _version(p) for p in ("torch", "transformers", "peft", "bitsandbytes", "triton", "lightning")
        },
    )
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = dict(
            name=props.name,
            memory_gib=round(props.total_memory / 2**30, 1),
            multiprocessors=props.multi_processor_count,
            cuda=torch.version.cuda,
        )
    return info


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    fns: dict[str, Callable[[], object]], repeats: int, device: torch.device, warmup: int = 2
) -> dict[str, list[float]]:
    """Milliseconds per call of each function, the functions taking turns within each repeat."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            samples[name].append((time.perf_counter() - start) * 1e3)
    return samples


def time_gpu_kernel(fn: Callable[[], object], repeats: int = 100, warmup: int = 10) -> list[float]:
    """Milliseconds per call measured with CUDA events around each call (for short kernels, where
    host timers would mostly measure the launch)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def summary(samples: list[float]) -> dict:
    return dict(
        median=round(statistics.median(samples), 4),
        min=round(min(samples), 4),
        max=round(max(samples), 4),
        samples=[round(s, 4) for s in samples],
    )


def ratio(ours: list[float], theirs: list[float]) -> dict:
    """ours / theirs: of the medians, and the range over the paired repeats; ``verdict`` is
    ``faster`` / ``slower`` only when the whole range is on one side of 1."""
    pairs = [a / b for a, b in zip(ours, theirs)]
    low, high = min(pairs), max(pairs)
    verdict = "faster" if high < 1 else "slower" if low > 1 else "tie"
    return dict(
        median=round(statistics.median(ours) / statistics.median(theirs), 3),
        low=round(low, 3),
        high=round(high, 3),
        verdict=verdict,
    )


def write_result(name: str, device: torch.device, result: dict) -> Path:
    """benchmarks/results/<name>_<device tag>.json, written atomically."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}_{device_tag(device)}.json"
    return write_atomically(path, json.dumps(result, indent=2) + "\n")


def print_table(header: tuple[str, ...], rows: list[tuple], title: str) -> None:
    rows = [tuple(str(x) for x in row) for row in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    print(title)
    for i, line in enumerate([header, *rows]):
        print("| " + " | ".join(str(x).ljust(w) for x, w in zip(line, widths)) + " |")
        if i == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")


def measured_ceilings(device: torch.device) -> dict:
    """The two ceilings of this GPU, measured now: device-to-device copy bandwidth (bytes read plus
    bytes written) and the bf16 matrix-product rate on random data (8192^3)."""
    if device.type != "cuda":
        return {}
    src = torch.randn(256 * 2**20, device=device)  # 1 GiB of fp32
    dst = torch.empty_like(src)
    copy_ms = statistics.median(time_gpu_kernel(lambda: dst.copy_(src), repeats=20, warmup=3))
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    mm_ms = statistics.median(time_gpu_kernel(lambda: a @ b, repeats=20, warmup=3))
    src = dst = a = b = None  # free the 1.5 GiB before the caller measures anything
    torch.cuda.empty_cache()
    return dict(
        copy_bandwidth_gb_s=round(2 * 2**30 / (copy_ms * 1e-3) / 1e9, 1),
        bf16_matmul_tflop_s=round(2 * n**3 / (mm_ms * 1e-3) / 1e12, 1),
    )


def swap_to_bitsandbytes_nf4(model: nn.Module, compute_dtype: torch.dtype) -> nn.Module:
    """Every linear ``peftcore.quantize`` would quantize becomes a bitsandbytes Linear4bit (NF4,
    double quantization, blocksize 64) made from the same fp32 weight, on the model's device."""
    import bitsandbytes as bnb

    import peftcore
    from peftcore.weights import is_quantized

    probe = copy.deepcopy(model).to("meta")
    peftcore.quantize(probe, peftcore.NF4Config(blocksize=64, double_quant=True))
    quantized = [name for name, m in probe.named_modules() if is_quantized(m)]
    for name in quantized:
        module = model.get_submodule(name)
        layer = bnb.nn.Linear4bit(
            module.in_features,
            module.out_features,
            bias=module.bias is not None,
            compute_dtype=compute_dtype,
            compress_statistics=True,
            quant_type="nf4",
            device="cpu",
        )
        layer.weight = bnb.nn.Params4bit(
            module.weight.data.cpu(),
            requires_grad=False,
            compress_statistics=True,
            quant_type="nf4",
            blocksize=64,
        )
        # On CPUs with AVX512-BF16, bitsandbytes runs an eval-mode forward whose input needs no
        # gradient through a bf16 kernel, whatever compute_dtype says (measured: logits 0.02 off
        # fp32); the comparison is with the compute dtype asked for.
        layer.support_avx512bf16_for_cpu = False
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer.to(module.weight.device))
    return model

"""Memory: each method's footprint and the peak memory of a training step, ours next to peft.

    python -m benchmarks.bench_memory [--device cuda] [--shape t5-small] [--methods ...]

Every (method, library) pair runs in a process of its own, so that one's allocations cannot hide
in another's peak. In it the model of ``--shape`` is built and wrapped (QLoRA: NF4 with double
quantization; peft's over bitsandbytes ``Linear4bit``), then one training step (forward,
backward, AdamW step) runs on a batch of ``--batch`` tokens. Reported:

* footprint: the bytes of the model's parameters and buffers (the quantization state included);
* step peak: on CPU the peak resident memory of the process during the step above its resident
  memory before it (the kernel's high-water mark is reset first, ``/proc/self/clear_refs``, and
  large allocations bypass glibc's heap so that freed memory leaves the resident set); on
  CUDA ``torch.cuda.max_memory_allocated`` during the step above the allocated memory before it.
  The step measured is the second: the first allocates the optimizer's state (then counted in
  "before") and initialises libraries lazily.

The ratio is ours / peft (below 1: ours is leaner). Results go to
``benchmarks/results/bench_memory_<device>.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks import common
from benchmarks.common import machine, print_table, write_result

ROOT = Path(__file__).resolve().parents[1]
LIBRARIES = ("ours", "peft")
# glibc keeps freed heap memory resident and reuses it, so a step's resident peak would depend on
# what earlier steps left behind (measured: peft 204 or 353 MiB in two identical runs). With every
# allocation over 64 KiB mapped and unmapped on its own, resident memory follows live memory.
CHILD_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}


def _methods() -> dict:
    import peftcore
    from benchmarks.bench_train_step import METHODS

    return {
        **METHODS,
        "dora r=16 q,v": dict(config=peftcore.DoRAConfig(r=16, alpha=32, target_modules=("q", "v"))),
        "prompt tuning (20 tokens)": dict(config=peftcore.PromptTuningConfig(num_virtual_tokens=20)),
    }


def _kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def footprint(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def measure_one(shape: str, method: str, library: str, device: torch.device, batch_shape: list[int]) -> dict:
    """In this process: build, wrap, one step; the footprint and the step's peak."""
    import peft

    import peftcore
    from benchmarks.bench_train_step import build_base, make_batch, make_step
    from benchmarks.common import swap_to_bitsandbytes_nf4
    from peftcore.checkpoint import to_peft_config

    spec = _methods()[method]
    config, nf4 = spec["config"], spec.get("nf4", False)
    base = build_base(shape, device)
    compute = torch.bfloat16 if device.type == "cuda" else torch.float32
    if library == "ours":
        model = base
        if nf4:
            peftcore.quantize(
                model, peftcore.NF4Config(blocksize=64, double_quant=True, compute_dtype=compute)
            )
        peftcore.inject(model, config)
    else:
        probe = peftcore.inject(copy.deepcopy(base).to("meta"), config)
        data = {**to_peft_config(probe.peftcore_config, probe), "inference_mode": False}
        model = swap_to_bitsandbytes_nf4(base, compute) if nf4 else base
        model = peft.get_peft_model(model, peft.PeftConfig.from_peft_type(**data))
    model.train()
    batch = make_batch(*batch_shape, device)
    autocast = (
        (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else nullcontext
    )
    step = make_step(model, batch, autocast)
    step()  # the first step allocates the optimizer's state and initialises libraries lazily: not measured
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
    else:
        Path("/proc/self/clear_refs").write_text("5")  # the high-water mark starts again from now
        before = _kib("VmRSS")
        step()
        peak = _kib("VmHWM") - before
    return dict(
        footprint_bytes=footprint(model),
        step_peak_bytes=peak,
        trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
    )


def main(argv: list[str] | None = None) -> dict:
    parser = common.parser(__doc__)
    parser.add_argument("--shape", default="t5-small")
    parser.add_argument(
        "--methods",
        nargs="+",
        default=None,
        help="default: every method of the training-step benchmark, DoRA, prompt tuning",
    )
    parser.add_argument("--batch", type=int, nargs=3, default=[8, 512, 128], metavar=("N", "SRC", "TGT"))
    parser.add_argument(
        "--one", nargs=2, metavar=("METHOD", "LIBRARY"), help=argparse.SUPPRESS
    )  # a child's job
    args, device = common.parse(parser, argv)
    if args.one:
        print(json.dumps(measure_one(args.shape, args.one[0], args.one[1], device, args.batch)))
        return {}
    methods = args.methods or list(_methods())
    unknown = sorted(set(methods) - set(_methods()))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {list(_methods())}")
    result = dict(
        benchmark="memory: footprint and training-step peak, ours vs peft",
        machine=machine(device),
        settings={k: v for k, v in vars(args).items() if k != "one"},
        results=[],
    )
    for method in methods:
        row = dict(shape=args.shape, method=method, batch=args.batch)
        for library in LIBRARIES:
            command = [
                sys.executable,
                "-m",
                "benchmarks.bench_memory",
                "--one",
                method,
                library,
                "--shape",
                args.shape,
                "--device",
                args.device,
                "--batch",
                *map(str, args.batch),
            ]
            if args.threads:
                command += ["--threads", str(args.threads)]
            done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=CHILD_ENV)
            if done.returncode:
                raise RuntimeError(f"{method} / {library} failed:\n{done.stderr[-3000:]}")
            row[library] = json.loads(done.stdout.strip().splitlines()[-1])
        row["footprint_ratio"] = round(row["ours"]["footprint_bytes"] / row["peft"]["footprint_bytes"], 4)
        row["step_peak_ratio"] = round(row["ours"]["step_peak_bytes"] / row["peft"]["step_peak_bytes"], 4)
        result["results"].append(row)
        write_result("bench_memory", device, result)
        print(
            f"{method}: footprint {row['ours']['footprint_bytes'] / 2**20:.1f} / {row['peft']['footprint_bytes'] / 2**20:.1f} MiB, "
            f"step peak {row['ours']['step_peak_bytes'] / 2**20:.0f} / {row['peft']['step_peak_bytes'] / 2**20:.0f} MiB",
            flush=True,
        )
    mib = lambda b: f"{b / 2**20:,.1f}"  # noqa: E731
    print_table(
        ("method", "footprint MiB ours / peft", "step peak MiB ours / peft", "peak ratio"),
        [
            (
                r["method"],
                f"{mib(r['ours']['footprint_bytes'])} / {mib(r['peft']['footprint_bytes'])}",
                f"{mib(r['ours']['step_peak_bytes'])} / {mib(r['peft']['step_peak_bytes'])}",
                r["step_peak_ratio"],
            )
            for r in result["results"]
        ],
        f"memory on {args.shape}, {device}, batch {args.batch}",
    )
    return result


if __name__ == "__main__":
    main()

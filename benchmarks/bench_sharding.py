"""Per-rank model memory under FSDP2 (peftcore.sharding), measured on N CPU processes (gloo).

    python -m benchmarks.bench_sharding [--shape t5-base] [--ranks 1 2 4]

For each method (full fine-tuning, LoRA r=16 q,v, QLoRA r=16 q,v with double quantization) and each
number of ranks, the model is built from its config (random weights: only bytes are counted),
sharded with ``peftcore.sharding.shard`` and each rank reports the bytes it holds itself: its
slices of the parameters (``DTensor.to_local``) and the buffers it keeps whole. Reported: the
whole model's bytes (1 rank), each rank's bytes at N ranks, and their ratio, against 1/N. The
4-bit base's column counts its storage alone (packed weights, absmax and the fp32 scales).
Activations, gradients and optimizer states are not counted here (``bench_memory`` measures a
step's peak on one device). Results: ``benchmarks/results/bench_sharding_<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

import peftcore
from benchmarks.common import machine, print_table, write_result
from peftcore.sharding import shard
from peftcore.testing import random_t5

METHODS = ("full", "lora r=16 q,v", "qlora r=16 q,v")
STORAGE = ("weight_packed", "absmax", "absmax2", "absmax_offset")


def build(shape: str, method: str) -> torch.nn.Module:
    model = random_t5(shape)
    if method.startswith("qlora"):
        peftcore.quantize(model, peftcore.NF4Config())
    if method != "full":
        peftcore.inject(model, peftcore.LoRAConfig(r=16, alpha=32, target_modules=("q", "v")))
    return model


def held_bytes(model: torch.nn.Module) -> dict[str, int]:
    """Bytes this rank holds: every parameter's local slice and every buffer; the 4-bit storage apart."""
    held = {"model": 0, "base_4bit": 0}
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        size = local.numel() * local.element_size()
        held["model"] += size
        if name.rsplit(".", 1)[-1] in STORAGE:
            held["base_4bit"] += size
    return held


def worker(rank: int, world: int, shape: str, method: str, rendezvous: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        model = shard(build(shape, method), init_device_mesh("cpu", (world,)))
        Path(out, f"{rank}.json").write_text(json.dumps(held_bytes(model)))
    finally:
        dist.destroy_process_group()


def measure(shape: str, method: str, world: int) -> list[dict[str, int]]:
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(
            worker, args=(world, shape, method, f"{tmp}/rendezvous", tmp), nprocs=world, start_method="spawn"
        )
        return [json.loads(Path(tmp, f"{rank}.json").read_text()) for rank in range(world)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="t5-base")
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    results, rows = [], []
    for method in args.methods:
        whole = held_bytes(build(args.shape, method))
        for world in args.ranks:
            ranks = measure(args.shape, method, world)
            largest = {key: max(r[key] for r in ranks) for key in whole}
            ratio = {key: round(largest[key] / whole[key], 4) if whole[key] else None for key in whole}
            results.append(dict(method=method, ranks=world, whole=whole, per_rank=ranks, largest_ratio=ratio))
            rows.append(
                (
                    method,
                    world,
                    f"{whole['model'] / 2**20:,.1f}",
                    f"{largest['model'] / 2**20:,.1f}",
                    ratio["model"],
                    f"{whole['base_4bit'] / 2**20:,.1f}" if whole["base_4bit"] else "-",
                    ratio["base_4bit"] if whole["base_4bit"] else "-",
                    round(1 / world, 4),
                )
            )
    header = ("method", "ranks", "model MiB", "largest rank MiB", "ratio", "4-bit base MiB", "ratio", "1/N")
    print_table(header, rows, f"model memory per rank under FSDP2, {args.shape} (CPU, gloo)")
    device = torch.device("cpu")
    path = write_result(
        "bench_sharding",
        device,
        dict(benchmark="sharding", machine=machine(device), settings=vars(args), results=results),
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

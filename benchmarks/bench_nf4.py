"""NF4 quantize / dequantize speed: peftcore.nf4 next to bitsandbytes, on the current device.

    python -m benchmarks.bench_nf4 [--repeats 20] [--device cuda] [--threads 1]

For t5-base-sized weights (768x768 attention, 3072x768 feed-forward) it times, in one run:
quantization of an fp32 weight with double quantization (QLoRA's setting) and dequantization to
bf16 (what every forward pass does; on the CPU also to fp32, QLoRA's compute dtype there), by each
of our paths (the native CPU kernel, PyTorch ops), median over ``--repeats`` runs after a warm-up (and the
fastest run, which shared machines disturb least). It checks that both libraries produce identical
results, prints a table (ratio = ours / bitsandbytes, below 1 is faster) and writes JSON to
``benchmarks/results/bench_nf4_<device>.json``.

On CUDA it adds: our Triton kernel (the default there) and ``torch.compile`` of the PyTorch path,
each against bitsandbytes' kernel, timed with CUDA events; a large 16384x16384 weight, where the
kernels rather than the launches set the time; and the achieved bandwidth of each dequantization
(bytes read + written) next to the device-to-device copy bandwidth measured in the same run.
"""

from __future__ import annotations

import copy
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks import common
from benchmarks.common import (
    machine,
    measured_ceilings,
    print_table,
    ratio,
    summary,
    time_gpu_kernel,
    time_interleaved,
    write_result,
)
from peftcore.kernels import nf4_cpu
from peftcore.nf4 import dequantize_nf4, quantize_nf4, triton_available

SHAPES = {"attention 768x768": (768, 768), "feed-forward 3072x768": (3072, 768)}
LARGE = {
    "large 16384x16384": (16384, 16384)
}  # CUDA only: 268 M weights, 671 MB moved per bf16 dequantization


def timed(fns: dict[str, Callable[[], object]], repeats: int, device: torch.device) -> dict[str, list[float]]:
    """CUDA: each function timed with events, the two taking turns; CPU: wall clock, interleaved."""
    if device.type != "cuda":
        return time_interleaved(fns, repeats, device)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            samples[name] += time_gpu_kernel(fn, repeats=1, warmup=1)
    return samples


def bench_shape(
    label: str, shape: tuple[int, int], device: torch.device, repeats: int, quantize: bool
) -> list[dict]:
    import bitsandbytes.functional as BF

    weight = 0.02 * torch.randn(shape, device=device, generator=torch.Generator(device).manual_seed(0))
    ours = quantize_nf4(weight, 64, double_quant=True)
    packed, theirs = BF.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=True)
    theirs.dtype = torch.bfloat16
    same_state = torch.equal(ours.packed, packed.view(-1)) and torch.equal(ours.absmax, theirs.absmax)
    reference = BF.dequantize_4bit(packed, theirs)
    n = weight.numel()

    def moved(op: str) -> int:  # packed bytes read, the output written, 8-bit absmax read
        return n // 2 + n * (4 if "fp32" in op else 2) + ours.absmax.numel()

    cases = []
    if quantize:
        cases.append(
            (
                "quantize fp32 -> nf4 (+double quant)",
                lambda: quantize_nf4(weight, 64, double_quant=True),
                lambda: BF.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=True),
                same_state,
            )
        )
    if device.type == "cpu" and nf4_cpu.available():  # the library's default on the CPU
        theirs_fp32 = copy.copy(theirs)
        theirs_fp32.dtype = torch.float32
        for dtype, state, name in ((torch.bfloat16, theirs, "bf16"), (torch.float32, theirs_fp32, "fp32")):
            cases.append(
                (
                    f"dequantize nf4 -> {name}, native kernel",
                    lambda dtype=dtype: dequantize_nf4(ours, dtype, backend="native"),
                    lambda state=state: BF.dequantize_4bit(packed, state),
                    torch.equal(
                        dequantize_nf4(ours, dtype, backend="native"), BF.dequantize_4bit(packed, state)
                    ),
                )
            )
    cases.append(
        (
            "dequantize nf4 -> bf16, torch ops",
            lambda: dequantize_nf4(ours, torch.bfloat16, backend="torch"),
            lambda: BF.dequantize_4bit(packed, theirs),
            torch.equal(dequantize_nf4(ours, torch.bfloat16, backend="torch"), reference),
        )
    )
    if device.type == "cuda":
        if triton_available():
            cases.append(
                (
                    "dequantize nf4 -> bf16, Triton kernel",
                    lambda: dequantize_nf4(ours, torch.bfloat16, backend="triton"),
                    lambda: BF.dequantize_4bit(packed, theirs),
                    torch.equal(dequantize_nf4(ours, torch.bfloat16, backend="triton"), reference),
                )
            )
        compiled = torch.compile(lambda state: dequantize_nf4(state, torch.bfloat16, backend="torch"))
        cases.append(
            (
                "dequantize nf4 -> bf16, torch.compile",
                lambda: compiled(ours),
                lambda: BF.dequantize_4bit(packed, theirs),
                torch.equal(compiled(ours), reference),
            )
        )
    default_path = (
        "Triton kernel"
        if device.type == "cuda" and triton_available()
        else "native kernel"
        if device.type == "cpu" and nf4_cpu.available()
        else "torch ops"
    )
    rows = []
    for op, fn_ours, fn_theirs, identical in cases:
        times = timed({"ours": fn_ours, "bitsandbytes": fn_theirs}, repeats, device)
        row = dict(
            op=op,
            default=op.endswith(default_path),  # the path dequantize_nf4 takes by default here
            weight=label,
            identical=bool(identical),
            ours_ms=summary(times["ours"]),
            bitsandbytes_ms=summary(times["bitsandbytes"]),
            ratio=ratio(times["ours"], times["bitsandbytes"]),
        )
        if op.startswith("dequantize"):
            row["bytes_moved"] = moved(op)
            row["ours_gb_s"] = round(moved(op) / (row["ours_ms"]["median"] * 1e-3) / 1e9, 1)
            row["bitsandbytes_gb_s"] = round(moved(op) / (row["bitsandbytes_ms"]["median"] * 1e-3) / 1e9, 1)
        rows.append(row)
    return rows


def sweep_triton(device: torch.device, repeats: int) -> list[dict]:
    """Time the Triton kernel over its launch settings (bytes per program, warps per program)."""
    from peftcore import nf4_triton
    from peftcore.nf4_format import table

    rows = []
    for label, shape in {**SHAPES, **LARGE}.items():
        weight = 0.02 * torch.randn(shape, device=device, generator=torch.Generator(device).manual_seed(0))
        s = quantize_nf4(weight, 64, double_quant=True)
        n = weight.numel()
        moved = n // 2 + n * 2 + s.absmax.numel()
        for per_program in (512, 1024, 2048, 4096):
            for warps in (2, 4, 8):

                def run(s=s, per_program=per_program, warps=warps) -> torch.Tensor:
                    return nf4_triton.dequantize(
                        s.packed,
                        s.absmax,
                        s.absmax2,
                        s.offset,
                        table("nf4", device),
                        table("dynamic8", device),
                        s.shape,
                        64,
                        torch.bfloat16,
                        bytes_per_program=per_program,
                        num_warps=warps,
                    )

                ms = statistics.median(time_gpu_kernel(run, repeats=repeats, warmup=3))
                rows.append(
                    dict(
                        weight=label,
                        bytes_per_program=per_program,
                        num_warps=warps,
                        ms=round(ms, 5),
                        gb_s=round(moved / (ms * 1e-3) / 1e9, 1),
                    )
                )
    return rows


def probe_reciprocals(device: torch.device) -> list[dict]:
    """Which ``1 / absmax`` reproduces bitsandbytes' CUDA quantization: for each candidate PTX
    instruction, the number of packed NF4 bytes and 8-bit absmax codes (double quantization) that
    differ from bitsandbytes' on 16.8 M Gaussian weights. The library uses the one with no difference."""
    import bitsandbytes.functional as BF

    from peftcore import nf4_triton
    from peftcore.nf4_format import table

    rows = []
    for blocksize in (64, 128, 256):
        weight = 0.02 * torch.randn(
            4096 * 4096, device=device, generator=torch.Generator(device).manual_seed(blocksize)
        )
        packed, theirs = BF.quantize_4bit(
            weight, blocksize=blocksize, quant_type="nf4", compress_statistics=True
        )
        blocks = weight.view(-1, blocksize)
        absmax = blocks.abs().amax(dim=1)
        centred = (absmax - absmax.mean()).view(-1, 256)
        absmax2 = centred.abs().amax(dim=1)
        for name in nf4_triton.RECIPROCALS:
            scaled = (blocks * nf4_triton.reciprocal(absmax, name).unsqueeze(1)).clamp(-1, 1).view(-1)
            q = torch.bucketize(scaled, table("nf4_midpoints", device)).to(torch.uint8)
            ours = (q[0::2] << 4) | q[1::2]
            scaled8 = (centred * nf4_triton.reciprocal(absmax2, name).unsqueeze(1)).clamp(-1, 1).view(-1)
            q8 = torch.bucketize(scaled8, table("dynamic8_midpoints", device)).to(torch.uint8)
            rows.append(
                dict(
                    blocksize=blocksize,
                    reciprocal=name,
                    nf4_bytes_differing=int((ours != packed.view(-1)).sum()),
                    absmax_codes_differing=int((q8 != theirs.absmax).sum()),
                    bytes=ours.numel(),
                )
            )
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = common.parser(__doc__)
    parser.add_argument(
        "--repeats", type=int, default=20, help="timed runs per measurement (median is reported)"
    )
    parser.add_argument(
        "--sweep", action="store_true", help="CUDA: also time the Triton kernel's launch settings"
    )
    args, device = common.parse(parser, argv)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())

    shapes = {**SHAPES, **(LARGE if device.type == "cuda" else {})}
    rows = [
        row
        for label, shape in shapes.items()
        for row in bench_shape(label, shape, device, args.repeats, quantize=label in SHAPES)
    ]
    result = dict(
        benchmark="nf4 quantize/dequantize, blocksize 64, double quantization",
        machine=machine(device),
        ceilings=measured_ceilings(device),
        repeats=args.repeats,
        results=rows,
    )
    if args.sweep and device.type == "cuda":
        result["reciprocal_probe"] = probe_reciprocals(device)
        for row in result["reciprocal_probe"]:
            print("reciprocal probe:", row)
        result["triton_sweep"] = sweep_triton(device, args.repeats)
        best = {}
        for r in result["triton_sweep"]:
            if r["weight"] not in best or r["ms"] < best[r["weight"]]["ms"]:
                best[r["weight"]] = r
        print("fastest Triton launch settings:", best)
    copy_bw = result["ceilings"].get("copy_bandwidth_gb_s")
    table = []
    for r in rows:
        bw = (
            f"{r['ours_gb_s']} GB/s"
            + (f" ({100 * r['ours_gb_s'] / copy_bw:.0f}% of copy)" if copy_bw else "")
            if "ours_gb_s" in r
            else ""
        )
        table.append(
            (
                r["op"],
                r["weight"],
                r["ours_ms"]["median"],
                r["bitsandbytes_ms"]["median"],
                f"{r['ratio']['median']:.2f} [{r['ratio']['low']:.2f}, {r['ratio']['high']:.2f}]",
                bw,
                "yes" if r["identical"] else "NO",
            )
        )
    print_table(
        ("operation", "weight", "peftcore ms", "bnb ms", "ratio [range]", "our bandwidth", "identical"),
        table,
        f"NF4 on {result['machine']['device']}, median of {args.repeats} (copy bandwidth {copy_bw} GB/s)"
        if copy_bw
        else f"NF4 on {result['machine']['device']}",
    )
    path = write_result("bench_nf4", device, result)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()

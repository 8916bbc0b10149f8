"""Regenerate benchmarks/README.md's results from benchmarks/results/*.json: no figure is typed by hand.

    python -m benchmarks.report

Everything between the two ``<!-- results -->`` markers of benchmarks/README.md is rewritten: one
table per benchmark and device, and the speed targets with their verdict, computed from the
files; the targets table goes between the ``<!-- targets -->`` markers of the main README too.
A ratio whose spread over the interleaved repeats contains 1 is a tie, whatever its median. The
CPU targets on a step's cost above the floor are judged on a bootstrap interval of the median of
the paired ratios instead (``median_interval``): the min-max range only widens with more repeats.
"""

from __future__ import annotations

import json
import random
import statistics
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from peftcore.files import write_atomically

HERE = Path(__file__).resolve().parent
README = HERE / "README.md"
BEGIN, END = "<!-- results: begin (python -m benchmarks.report writes this part) -->", "<!-- results: end -->"
MAIN_README = HERE.parent / "README.md"
TARGETS_BEGIN, TARGETS_END = (
    "<!-- targets: begin (python -m benchmarks.report writes this part) -->",
    "<!-- targets: end -->",
)
END_TO_END_TARGET = 1.5  # ours / reference samples per second


def table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(str(x) for x in row) + " |" for row in rows]


def spread(r: dict) -> str:
    return f"{r['median']} [{r['low']}, {r['high']}]"


def where(data: dict) -> str:
    m = data["machine"]
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v)
    if "gpu" in m:
        gpu = m["gpu"]
        return f"{m['device']} ({gpu['name']}, {gpu['memory_gib']} GiB, CUDA {gpu['cuda']}; {versions})"
    return f"{m['device']} ({m['cpu']}, {m['threads']} threads; {versions})"


def above_floor(r: dict) -> dict | None:
    """Each library's cost above the floor, paired repeat by repeat (the three steps alternate):
    the median of (ours_i - floor_i) / (peft_i - floor_i) with its range, or None without a floor
    or when peft's cost is not clearly above it in every repeat (then no ratio means anything)."""
    if "floor_ms" not in r:
        return None
    ours, peft, floor = (r[k]["samples"] for k in ("ours_ms", "peft_ms", "floor_ms"))
    if min(b - f for b, f in zip(peft, floor)) <= 0:
        return None
    pairs = sorted((a - f) / (b - f) for a, b, f in zip(ours, peft, floor))
    low, high = median_interval(pairs)
    return dict(
        median=round(statistics.median(pairs), 3),
        low=round(pairs[0], 3),
        high=round(pairs[-1], 3),
        interval=[round(low, 3), round(high, 3)],
    )


def median_interval(samples: list[float], resamples: int = 2000, level: float = 0.95) -> tuple[float, float]:
    """A percentile bootstrap interval of the median (fixed seed: the report is reproducible). Unlike
    the min-max range of the repeats, which only widens with more of them, it narrows as repeats
    are added, so a small adapter's cost can get a verdict once there are enough."""
    rng = random.Random(0)
    medians = sorted(statistics.median(rng.choices(samples, k=len(samples))) for _ in range(resamples))
    cut = int(resamples * (1 - level) / 2)
    return medians[cut], medians[-cut - 1]


def mib(n: int) -> str:
    return f"{n / 2**20:,.1f}"


def parity(data: dict) -> list[str]:
    rows = [
        [
            r["case"],
            f"{r['adapter_effect_on_logits']:.2g}",
            f"{r['logits_max_abs_diff']:.1e}",
            f"{r['peft_reads_ours_logits_max_abs_diff']:.1e}",
            f"{r['loss_abs_diff']:.1e}",
            f"{r['grad_max_abs_diff']:.1e}",
            f"{r['grad_max_rel_diff']:.1e}",
            f"{r['peft_to_ours_logits_max_abs_diff']:.1e}",
            f"{r['trainable_ours']:,} / {r['trainable_peft']:,}",
        ]
        for r in data["results"]
    ]
    shape = data["results"][0]["shape"]
    return [
        f"**Parity** on {shape}, batch {data['settings']['batch']}: " + where(data),
        "",
        *table(
            [
                "case",
                "adapter's effect on logits",
                "max abs diff logits",
                "peft reads our file",
                "abs diff loss",
                "max abs diff grads",
                "grads relative",
                "we read peft's file",
                "trainable ours / peft",
            ],
            rows,
        ),
    ]


def train_step(data: dict) -> list[str]:
    s = data["settings"]
    rows = [
        [
            r["shape"],
            r["method"],
            round(r["ours_ms"]["median"]),
            round(r["peft_ms"]["median"]),
            round(r["floor_ms"]["median"]) if "floor_ms" in r else "",
            f"{r['overhead_ms']['ours']:.0f} / {r['overhead_ms']['peft']:.0f}" if "overhead_ms" in r else "",
            spread(r["ratio"]),
            r["ratio"]["verdict"],
            f"{r['parity']['loss_abs_diff']:.1e}",
            f"{r['parity']['grad_rel_diff']:.1e}",
        ]
        for r in data["results"]
    ]
    header = [
        "shape",
        "method",
        "ours ms",
        "peft ms",
        "floor ms",
        "above floor ours / peft ms",
        "ours / peft [range]",
        "verdict",
        "loss diff",
        "grad rel diff",
    ]
    if any("peak_step_memory_mib" in r and r["peak_step_memory_mib"].get("ours") for r in data["results"]):
        header += ["above floor ours / peft [range]", "step peak MiB ours / peft", "MFU"]
        for row, r in zip(rows, data["results"]):
            ratio_above = above_floor(r)
            peak = r["peak_step_memory_mib"]
            row += [
                spread(ratio_above) if ratio_above else "",
                f"{peak['ours']:,} / {peak['peft']:,}",
                f"{r['mfu_vs_measured_bf16_peak']:.1%}" if "mfu_vs_measured_bf16_peak" in r else "",
            ]
    if s.get("compile"):  # both compiled: the first step holds the compilation
        header.append("first step s ours / peft")
        for row, r in zip(rows, data["results"]):
            row.append(f"{r['first_step_s']['ours']} / {r['first_step_s']['peft']}")
    return [
        f"**Training step** ({s['precision']}, batch {s['batch']} x {s['src']} / {s['tgt']}, "
        f"{s['repeats']} interleaved repeats{', both compiled' if s.get('compile') else ''}; floor: the base "
        "alone, gradient to its inputs"
        + (
            f"; MFU: the step's FLOPs over the bf16 matrix-product rate measured in the same run, "
            f"{data['ceilings']['bf16_matmul_tflop_s']} TFLOP/s"
            if data.get("ceilings", {}).get("bf16_matmul_tflop_s")
            else ""
        )
        + "): "
        + where(data),
        "",
        *table(header, rows),
    ]


def end_to_end(data: dict) -> list[str]:
    s, runs = data["settings"], data["runs"]
    rows = [
        [
            name,
            [r["samples_per_s"] for r in runs[key]],
            runs[key][0]["padding_fraction"],
            [r["mean_loss"] for r in runs[key]],
        ]
        for name, key in (("experiments fit", "ours"), ("Seq2SeqTrainer + peft", "reference"))
    ]
    epochs = f"{s['epochs']} epochs, the last timed" if s["epochs"] > 1 else "1 epoch"
    return [
        f"**End to end** ({s['shape']}, the same {s['examples']} TweetSumm examples, {epochs}, batch 8, "
        f"{s['rounds']} rounds{', compiled' if s.get('compile') else ''}): " + where(data),
        "",
        *table(["", "samples/s per round", "padding fraction", "mean loss of the timed epoch"], rows),
        "",
        f"Speed-up ours / reference: {spread(data['speedup'])}.",
    ]


def memory(data: dict) -> list[str]:
    rows = [
        [
            r["method"],
            f"{mib(r['ours']['footprint_bytes'])} / {mib(r['peft']['footprint_bytes'])}",
            f"{mib(r['ours']['step_peak_bytes'])} / {mib(r['peft']['step_peak_bytes'])}",
            r["step_peak_ratio"],
        ]
        for r in data["results"]
    ]
    return [
        f"**Memory** ({data['results'][0]['shape']}, batch {data['settings']['batch']}; CPU: resident "
        "memory, GPU: allocated): " + where(data),
        "",
        *table(
            ["method", "footprint MiB ours / peft", "step peak MiB ours / peft", "peak ours / peft"], rows
        ),
    ]


def inference(data: dict) -> list[str]:
    s = data["settings"]
    every = ("ours unmerged", "ours merged", "ours unloaded", "peft unmerged", "peft merged", "peft unloaded")
    rows = [
        [
            r["method"],
            form,
            r[form]["tokens_per_s"],
            spread(r[form]["ratio_to_peft_unmerged"]),
            spread(r[form]["ratio_to_peft_same_form"]) if "ratio_to_peft_same_form" in r[form] else "",
            r[form]["same_tokens_as_peft_unmerged"],
        ]
        for r in data["results"]
        for form in every
        if form in r  # files written before the unloaded forms were measured lack them
    ]
    return [
        f"**Inference** (greedy generate, {s['batch']} x {s['src']} tokens in, {s['new_tokens']} out, "
        f"{s['repeats']} rounds): " + where(data),
        "",
        *table(
            [
                "method",
                "form",
                "tokens/s",
                "time / peft unmerged [range]",
                "time / peft's same form",
                "same tokens",
            ],
            rows,
        ),
    ]


def paged(data: dict) -> list[str]:
    rows = [
        [r["optimizer"], r["step_ms"]["median"], spread(r["ratio_to_bitsandbytes"]), r["peak_step_mib"]]
        for r in data["results"]
    ]
    return [
        f"**Paged AdamW** ({data['benchmark']}: {data['tensors']} tensors, {data['state_mib']} MiB of state, "
        f"budget {data['budget_mib']} MiB, median of {data['repeats']}): " + where(data),
        "",
        *table(["optimizer", "step ms", "time / bitsandbytes [range]", "peak MiB of a QLoRA step"], rows),
    ]


def nf4(data: dict) -> list[str]:
    def ms(x) -> object:  # older files hold a bare median, newer ones a summary
        return x["median"] if isinstance(x, dict) else x

    def ratio_of(r: dict) -> object:
        return spread(r["ratio"]) if isinstance(r["ratio"], dict) else r["ratio"]

    copy_bw = data.get("ceilings", {}).get("copy_bandwidth_gb_s")
    rows = [
        [
            r["op"],
            r["weight"],
            ms(r["ours_ms"]),
            ms(r["bitsandbytes_ms"]),
            ratio_of(r),
            (f"{r['ours_gb_s']} / {r['bitsandbytes_gb_s']}" if "ours_gb_s" in r else ""),
            r.get("identical", ""),
        ]
        for r in data["results"]
    ]
    if "machine" in data:
        title = f"**NF4** (blocksize 64, double quantization, median of {data['repeats']}): {where(data)}"
        if copy_bw:
            title += f"; device-to-device copy measured in the same run: {copy_bw} GB/s"
    else:
        title = (
            f"**NF4** ({data['device']}, {data['threads']} threads, median of {data['repeats']}; torch "
            f"{data['torch']}, bitsandbytes {data['bitsandbytes']}):"
        )
    header = ["op", "weight", "ours ms", "bitsandbytes ms", "ratio [range]", "GB/s ours / bnb", "identical"]
    return [title, "", *table(header, rows)]


def verdict(r: dict, target: float) -> str:
    """A ratio's verdict against an upper bound, from its range over the repeats."""
    if r["high"] <= target:
        return "met"
    if r["low"] > target:
        return "missed"
    return f"tie: the range includes {target}"


def gpu_step_targets(data: dict) -> list[list]:
    """Issue 23's targets for a GPU training step: each method's cost above the floor <= peft's
    (LoRA and DoRA <= 0.6x), QLoRA's whole step <= peft + bitsandbytes', and the MFU of LoRA."""
    rows, device = [], data["machine"]["device"]
    for r in data["results"]:
        label = f"{r['shape']} {r['method']}"
        ratio_above = above_floor(r)
        target = 0.6 if r["method"].startswith(("lora", "dora")) else 1.0
        if ratio_above:
            measured = (
                f"{spread(ratio_above)}; above the floor ours {r['overhead_ms']['ours']:.0f} ms, "
                f"peft {r['overhead_ms']['peft']:.0f} ms (floor {r['floor_ms']['median']:.0f} ms)"
            )
            rows.append(
                [
                    f"cost above the floor ours/peft <= {target}, {label}",
                    device,
                    measured,
                    verdict(ratio_above, target),
                ]
            )
        if r["method"].startswith("qlora"):
            rows.append(
                [
                    f"QLoRA step ours/(peft + bitsandbytes) <= 1.0, {label}",
                    device,
                    spread(r["ratio"]),
                    verdict(r["ratio"], 1.0),
                ]
            )
        if r["method"].startswith("lora") and "mfu_vs_measured_bf16_peak" in r:
            rows.append(
                [
                    f"model FLOPs utilisation, {label}",
                    device,
                    f"{r['mfu_vs_measured_bf16_peak']:.1%} of {data['ceilings']['bf16_matmul_tflop_s']} TFLOP/s "
                    f"({r['ours_tflop_s']} TFLOP/s)",
                    "reported (no target)",
                ]
            )
    return rows


def gpu_nf4_targets(data: dict) -> list[list]:
    """Issue 23's NF4 targets: dequantization (the kernel used on CUDA) at least as fast as
    bitsandbytes', and at least 70% of the copy bandwidth measured in the same run."""
    rows, device = [], data["machine"]["device"]
    copy_bw = data["ceilings"]["copy_bandwidth_gb_s"]
    for r in data["results"]:
        if r["op"] != "dequantize nf4 -> bf16, Triton kernel":
            continue
        rows.append(
            [
                f"NF4 dequantize ours/bitsandbytes <= 1.0, {r['weight']}",
                device,
                spread(r["ratio"]),
                verdict(r["ratio"], 1.0),
            ]
        )
        share = r["ours_gb_s"] / copy_bw
        rows.append(
            [
                f"NF4 dequantize >= 70% of copy bandwidth, {r['weight']}",
                device,
                f"{share:.0%} ({r['ours_gb_s']} of {copy_bw} GB/s; bitsandbytes {r['bitsandbytes_gb_s']})",
                "met" if share >= 0.7 else "missed",
            ]
        )
    return rows


# Issue 21's targets on the CPU: each method's cost above the floor (the frozen base with the
# gradient to its inputs, timed in the same repeats), ours / peft's, paired repeat by repeat.
ABOVE_FLOOR_TARGETS = (("qdora", 0.5), ("dora", 0.5), ("qlora", 1.0), ("lora", 0.6), ("ia3", 1.0))


def cpu_step_targets(data: dict) -> list[list]:
    rows, device = [], data["machine"]["device"]
    for r in data["results"]:
        target = next((t for prefix, t in ABOVE_FLOOR_TARGETS if r["method"].startswith(prefix)), None)
        above = above_floor(r)
        if target is None:
            continue
        costs = (
            f"; ours {r['overhead_ms']['ours']:.0f} ms, peft {r['overhead_ms']['peft']:.0f} ms above a floor of {r['floor_ms']['median']:.0f} ms"
            if "overhead_ms" in r
            else ""
        )
        if above is None:
            measured, judged = "no ratio: peft's cost is not above the floor in every repeat", "no verdict"
        else:  # judged on the bootstrap interval of the median: it narrows with repeats, a range does not
            low, high = above["interval"]
            measured = f"{spread(above)}, 95% interval of the median [{low}, {high}]"
            judged = verdict(dict(low=low, high=high), target)
        rows.append(
            [
                f"cost above the floor ours/peft <= {target}, {r['shape']} {r['method']}",
                device,
                measured + costs,
                judged,
            ]
        )
    return rows


def inference_targets(data: dict) -> list[list]:
    """Merged inference runs at the plain model's speed: ours merged / peft merged and ours
    unloaded / peft unloaded <= 1.0 in time (tokens/s the other way round)."""
    rows, device = [], data["machine"]["device"]
    for r in data["results"]:
        for form in ("ours merged", "ours unloaded"):
            if "ratio_to_peft_same_form" in r.get(form, {}):
                rows.append(
                    [
                        f"{form} / peft {form.split()[1]} generate time <= 1.0, {r['shape']} {r['method']}",
                        device,
                        spread(r[form]["ratio_to_peft_same_form"]),
                        verdict(r[form]["ratio_to_peft_same_form"], 1.0),
                    ]
                )
    return rows


def cpu_nf4_targets(data: dict) -> list[list]:
    """NF4 dequantization on the CPU at most bitsandbytes' time, bit-identical: judged for the path
    ``dequantize_nf4`` takes by default (rows marked ``default``; older files judged every row), on
    the bootstrap interval of the median paired ratio where the samples are stored."""
    rows, device = [], data["machine"]["device"] if "machine" in data else data["device"]
    for r in data["results"]:
        if not r["op"].startswith("dequantize") or not r.get("default", True):
            continue
        samples = (r["ours_ms"], r["bitsandbytes_ms"])
        if all(isinstance(s, dict) and "samples" in s for s in samples):
            low, high = median_interval([a / b for a, b in zip(*(s["samples"] for s in samples))])
            measured = f"{spread(r['ratio'])}, 95% interval of the median [{low:.3f}, {high:.3f}]"
            judged = verdict(dict(low=low, high=high), 1.0)
        elif isinstance(r["ratio"], dict):  # a summary with its range over the interleaved repeats
            measured, judged = spread(r["ratio"]), verdict(r["ratio"], 1.0)
        else:  # older files: a bare ratio of medians
            measured, judged = f"{r['ratio']}", "met" if r["ratio"] <= 1.0 else "missed"
        if not r["identical"]:
            judged = "missed (values differ)"
        path = r["op"].removeprefix("dequantize nf4 ")  # "-> bf16, native kernel"
        rows.append(
            [f"NF4 dequantize {path} ours/bitsandbytes <= 1.0, {r['weight']}", device, measured, judged]
        )
    return rows


def targets(results: dict[str, dict]) -> list[str]:
    """The targets table: one row per target and result file, its verdict computed from the file."""
    rows = []
    for name, data in results.items():
        if name.startswith("bench_train_step_cuda") and not data["settings"].get("compile"):
            rows += gpu_step_targets(data)
        elif name.startswith("bench_train_step_") and not data["settings"].get("compile"):
            rows += cpu_step_targets(data)
        if name.startswith("bench_inference_"):
            rows += inference_targets(data)
        if name.startswith("bench_nf4_cpu-2threads"):
            rows += cpu_nf4_targets(data)
        if name.startswith("bench_nf4_cuda"):
            rows += gpu_nf4_targets(data)
        if name.startswith("bench_end_to_end_") and not data["settings"].get("compile"):
            ok = data["speedup"]["median"] >= END_TO_END_TARGET
            padding = f"; padding {data['runs']['ours'][0]['padding_fraction']} vs {data['runs']['reference'][0]['padding_fraction']}"
            rows.append(
                [
                    f"end-to-end samples/s ours/reference >= {END_TO_END_TARGET}, {data['settings']['shape']}",
                    data["machine"]["device"],
                    spread(data["speedup"]) + padding,
                    "met" if ok else "missed",
                ]
            )
    return table(["target", "device", "measured [range]", "verdict"], rows)


SECTIONS = (
    ("bench_parity_", parity),
    ("bench_train_step_", train_step),
    ("bench_end_to_end_", end_to_end),
    ("bench_memory_", memory),
    ("bench_inference_", inference),
    ("bench_nf4_", nf4),
    ("bench_paged_", paged),
)


def load(results_dir: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(results_dir.glob("*.json"))}


def render(results: dict[str, dict]) -> str:
    """benchmarks/README.md's generated part: the targets, then every result file's table."""
    out = [
        "",
        "",
        "**Targets** (verdicts computed from the result files listed below):",
        "",
        *targets(results),
        "",
    ]
    for prefix, render_one in SECTIONS:
        for name, data in results.items():
            if name.startswith(prefix) and data.get("results", data.get("runs")):
                out += [f"<!-- from results/{name}.json -->", *render_one(data), ""]
    return "\n".join(out)


def replace_between(path: Path, begin: str, end: str, body: str) -> None:
    """Rewrite what lies between the markers ``begin`` and ``end`` of ``path`` (atomically)."""
    text = path.read_text()
    if begin not in text or end not in text:
        raise SystemExit(
            f"{path} lacks the markers {begin!r} ... {end!r}: put them where the generated part goes"
        )
    head, rest = text.split(begin, 1)
    write_atomically(path, head + begin + body + end + rest.split(end, 1)[1])
    print(f"wrote {path}")


def main(results_dir: Path = HERE / "results") -> None:
    results = load(results_dir)
    replace_between(README, BEGIN, END, render(results) + "\n")
    replace_between(MAIN_README, TARGETS_BEGIN, TARGETS_END, "\n" + "\n".join(targets(results)) + "\n")


if __name__ == "__main__":
    main()

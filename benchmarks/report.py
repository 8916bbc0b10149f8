"""Regenerate benchmarks/README.md's results from benchmarks/results/*.json: no figure is typed by hand.

    python -m benchmarks.report

Everything between the two ``<!-- results -->`` markers of benchmarks/README.md is rewritten: one
table per benchmark and device, and the speed targets with their verdict, computed from the
files; the targets table goes between the ``<!-- targets -->`` markers of the main README too.
A ratio whose spread over the interleaved repeats contains 1 is a tie, whatever its median.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from peftcore.files import write_atomically

HERE = Path(__file__).resolve().parent
README = HERE / "README.md"
BEGIN, END = "<!-- results: begin (python -m benchmarks.report writes this part) -->", "<!-- results: end -->"
MAIN_README = HERE.parent / "README.md"
TARGETS_BEGIN, TARGETS_END = "<!-- targets: begin (python -m benchmarks.report writes this part) -->", "<!-- targets: end -->"
STEP_TARGET = 0.95  # ours / peft, LoRA and IA3 training step
END_TO_END_TARGET = 1.5  # ours / reference samples per second


def table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(str(x) for x in row) + " |" for row in rows]


def spread(r: dict) -> str:
    return f"{r['median']} [{r['low']}, {r['high']}]"


def where(data: dict) -> str:
    m = data["machine"]
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v)
    return f"{m['device']} ({m['cpu']}, {m['threads']} threads; {versions})"


def mib(n: int) -> str:
    return f"{n / 2**20:,.1f}"


def parity(data: dict) -> list[str]:
    rows = [[r["case"], f"{r['adapter_effect_on_logits']:.2g}", f"{r['logits_max_abs_diff']:.1e}",
             f"{r['peft_reads_ours_logits_max_abs_diff']:.1e}", f"{r['loss_abs_diff']:.1e}",
             f"{r['grad_max_abs_diff']:.1e}", f"{r['grad_max_rel_diff']:.1e}",
             f"{r['peft_to_ours_logits_max_abs_diff']:.1e}", f"{r['trainable_ours']:,} / {r['trainable_peft']:,}"]
            for r in data["results"]]
    shape = data["results"][0]["shape"]
    return [f"**Parity** on {shape}, batch {data['settings']['batch']}: " + where(data), "",
            *table(["case", "adapter's effect on logits", "max abs diff logits", "peft reads our file",
                    "abs diff loss", "max abs diff grads", "grads relative", "we read peft's file",
                    "trainable ours / peft"], rows)]


def train_step(data: dict) -> list[str]:
    s = data["settings"]
    rows = [[r["shape"], r["method"], round(r["ours_ms"]["median"]), round(r["peft_ms"]["median"]),
             round(r["floor_ms"]["median"]) if "floor_ms" in r else "",
             f"{r['overhead_ms']['ours']:.0f} / {r['overhead_ms']['peft']:.0f}" if "overhead_ms" in r else "",
             spread(r["ratio"]), r["ratio"]["verdict"], f"{r['parity']['loss_abs_diff']:.1e}",
             f"{r['parity']['grad_rel_diff']:.1e}"]
            for r in data["results"]]
    header = ["shape", "method", "ours ms", "peft ms", "floor ms", "above floor ours / peft ms",
              "ours / peft [range]", "verdict", "loss diff", "grad rel diff"]
    if s.get("compile"):  # both compiled: the first step holds the compilation
        header.append("first step s ours / peft")
        for row, r in zip(rows, data["results"]):
            row.append(f"{r['first_step_s']['ours']} / {r['first_step_s']['peft']}")
    return [f"**Training step** ({s['precision']}, batch {s['batch']} x {s['src']} / {s['tgt']}, "
            f"{s['repeats']} interleaved repeats{', both compiled' if s.get('compile') else ''}; floor: the fp32 base "
            "alone, gradient to its inputs): " + where(data), "", *table(header, rows)]


def end_to_end(data: dict) -> list[str]:
    s, runs = data["settings"], data["runs"]
    rows = [[name, [r["samples_per_s"] for r in runs[key]], runs[key][0]["padding_fraction"],
             [r["mean_loss"] for r in runs[key]]]
            for name, key in (("experiments fit", "ours"), ("Seq2SeqTrainer + peft", "reference"))]
    epochs = f"{s['epochs']} epochs, the last timed" if s["epochs"] > 1 else "1 epoch"
    return [f"**End to end** ({s['shape']}, the same {s['examples']} TweetSumm examples, {epochs}, batch 8, "
            f"{s['rounds']} rounds{', compiled' if s.get('compile') else ''}): " + where(data), "",
            *table(["", "samples/s per round", "padding fraction", "mean loss of the timed epoch"], rows), "",
            f"Speed-up ours / reference: {spread(data['speedup'])}."]


def memory(data: dict) -> list[str]:
    rows = [[r["method"], f"{mib(r['ours']['footprint_bytes'])} / {mib(r['peft']['footprint_bytes'])}",
             f"{mib(r['ours']['step_peak_bytes'])} / {mib(r['peft']['step_peak_bytes'])}", r["step_peak_ratio"]]
            for r in data["results"]]
    return [f"**Memory** ({data['results'][0]['shape']}, batch {data['settings']['batch']}; CPU: resident "
            "memory, GPU: allocated): " + where(data), "",
            *table(["method", "footprint MiB ours / peft", "step peak MiB ours / peft", "peak ours / peft"], rows)]


def inference(data: dict) -> list[str]:
    s = data["settings"]
    forms = ("ours unmerged", "ours merged", "peft unmerged", "peft merged")
    rows = [[r["method"], form, r[form]["tokens_per_s"], spread(r[form]["ratio_to_peft_unmerged"]),
             r[form]["same_tokens_as_peft_unmerged"]] for r in data["results"] for form in forms]
    return [f"**Inference** (greedy generate, {s['batch']} x {s['src']} tokens in, {s['new_tokens']} out, "
            f"{s['repeats']} rounds): " + where(data), "",
            *table(["method", "form", "tokens/s", "time / peft unmerged [range]", "same tokens"], rows)]


def nf4(data: dict) -> list[str]:
    rows = [[r["op"], r["weight"], r["ours_ms"], r["bitsandbytes_ms"], r["ratio"], r.get("identical", "")]
            for r in data["results"]]
    return [f"**NF4** ({data['device']}, {data['threads']} threads, median of {data['repeats']}; torch "
            f"{data['torch']}, bitsandbytes {data['bitsandbytes']}):", "",
            *table(["op", "weight", "ours ms", "bitsandbytes ms", "ratio", "identical"], rows)]


def targets(results: dict[str, dict]) -> list[str]:
    """The targets table: one row per target and result file, its verdict computed from the file."""
    rows = []
    for name, data in results.items():
        if name.startswith("bench_train_step_") and not data["settings"].get("compile"):
            for r in data["results"]:
                if r["method"].startswith(("lora", "ia3")):
                    ok = r["ratio"]["median"] <= STEP_TARGET
                    sure = " (spread includes 1: not a clear win)" if r["ratio"]["verdict"] == "tie" else ""
                    above = (f"; above the floor ours {r['overhead_ms']['ours']:.0f} ms, peft {r['overhead_ms']['peft']:.0f} ms"
                             if "overhead_ms" in r else "")
                    rows.append([f"training step ours/peft <= {STEP_TARGET}, {r['shape']} {r['method']}",
                                 data["machine"]["device"], spread(r["ratio"]) + above, ("met" if ok else "missed") + sure])
        if name.startswith("bench_end_to_end_") and not data["settings"].get("compile"):
            ok = data["speedup"]["median"] >= END_TO_END_TARGET
            padding = f"; padding {data['runs']['ours'][0]['padding_fraction']} vs {data['runs']['reference'][0]['padding_fraction']}"
            rows.append([f"end-to-end samples/s ours/reference >= {END_TO_END_TARGET}, {data['settings']['shape']}",
                         data["machine"]["device"], spread(data["speedup"]) + padding, "met" if ok else "missed"])
    return table(["target", "device", "measured [range]", "verdict"], rows)


SECTIONS = (("bench_parity_", parity), ("bench_train_step_", train_step), ("bench_end_to_end_", end_to_end),
            ("bench_memory_", memory), ("bench_inference_", inference), ("bench_nf4_", nf4))


def load(results_dir: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(results_dir.glob("*.json"))}


def render(results: dict[str, dict]) -> str:
    """benchmarks/README.md's generated part: the targets, then every result file's table."""
    out = ["", "", "**Targets** (verdicts computed from the result files listed below):", "", *targets(results), ""]
    for prefix, render_one in SECTIONS:
        for name, data in results.items():
            if name.startswith(prefix) and data.get("results", data.get("runs")):
                out += [f"<!-- from results/{name}.json -->", *render_one(data), ""]
    return "\n".join(out)


def replace_between(path: Path, begin: str, end: str, body: str) -> None:
    """Rewrite what lies between the markers ``begin`` and ``end`` of ``path`` (atomically)."""
    text = path.read_text()
    if begin not in text or end not in text:
        raise SystemExit(f"{path} lacks the markers {begin!r} ... {end!r}: put them where the generated part goes")
    head, rest = text.split(begin, 1)
    write_atomically(path, head + begin + body + end + rest.split(end, 1)[1])
    print(f"wrote {path}")


def main(results_dir: Path = HERE / "results") -> None:
    results = load(results_dir)
    replace_between(README, BEGIN, END, render(results) + "\n")
    replace_between(MAIN_README, TARGETS_BEGIN, TARGETS_END, "\n" + "\n".join(targets(results)) + "\n")


if __name__ == "__main__":
    main()

"""``python -m experiments report``: one table across runs: Markdown + CSV, % change against a
base run, plots, TensorBoard.

Input: the run records that ``evaluate`` writes, one ``eval_record.json`` per run::

    {"run": "lora", "metrics": {"rouge1": 0.41, ..., "trainable_params": 884736, ...},
     "settings": {...}, "predictions": "runs/lora/predictions.jsonl"}

Output, in ``out_dir``: ``report.md`` (the tables, the settings, the plots), ``metrics.csv``
(one row per metric, one column per run, full precision), ``change.csv`` (% change against
the base run), ``metrics.png`` (one bar chart per metric), ``params_vs_rougeL.png``
(trainable parameters, log scale, against ROUGE-L) and ``tensorboard/`` (the same numbers as
scalars, the tables as text, the plots as figures; rewritten on each report).
A metric a run did not compute is a blank cell, never a zero; a record whose evaluation has
stages still pending (``pending`` in the record) is named under the table.

Records scored on different test examples (another test set, split or number of examples) or
with different BERTScore models do not compare: the report refuses them, naming the records and
what differs, unless ``allow_mixed`` is set; then the report says at its top what differs and
the change table is marked mixed.
"""

import csv
import io
import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any

import matplotlib

from peftcore.files import write_atomically

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt

RECORD_NAME = "eval_record.json"
# The study's order; metrics outside it (say peak_accelerator_memory) follow, sorted by name.
METRICS = (
    "rouge1", "rouge2", "rougeL", "rougeLsum",
    "precision", "recall", "f1",
    "relevance", "coherence", "consistency", "fluency",
    "all_params", "trainable_params", "trainable_params_percent",
    "epoch", "train_runtime", "memory_footprint",
    "all_params_stored", "trainable_percent_stored", "memory_footprint_stored",
)  # fmt: skip
STORED = ("all_params_stored", "trainable_percent_stored", "memory_footprint_stored")
CONVENTIONS = (
    "`all_params`, `trainable_params_percent` and `memory_footprint` (GiB) count a 4-bit weight as its "
    "logical elements and include its quantization state (peftcore's `count_parameters`, `memory_footprint`). "
    "The `*_stored` rows follow the seed study's convention, which is transformers' `num_parameters()` and "
    "`get_memory_footprint()` over bitsandbytes: a 4-bit weight as its stored elements (two per byte), the "
    "footprint without the quantization state. Without a 4-bit base the two agree.\n"
)
_LOG_SCALE = ("trainable_params", "trainable_params_percent")  # spans orders of magnitude across methods


# ----------------------------------------------------------------------------- records


def load_record(record: dict[str, Any] | str | Path) -> dict[str, Any]:
    """A run record: as given, or read from a JSON file, or from ``<dir>/eval_record.json``."""
    if isinstance(record, dict):
        source, data = "a record", record
    else:
        path = Path(record)
        path = path / RECORD_NAME if path.is_dir() else path
        source, data = str(path), json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data.get("run"), str) or not isinstance(data.get("metrics"), dict):
        raise ValueError(f"{source} is not a run record: it needs a 'run' name and a 'metrics' object")
    for name, value in data["metrics"].items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ValueError(f"run {data['run']!r}: metric {name!r} is {value!r}, expected a number or null")
    return data


def differences(records: list[dict[str, Any]]) -> list[str]:
    """What makes the records' scores incomparable, one line per setting that differs (among
    the records that state it): the test set, the number of examples, the BERTScore model."""
    settings = {r["run"]: r.get("settings") or {} for r in records}
    with_bertscore = {r["run"] for r in records if r["metrics"].get("f1") is not None}
    checks = [
        ("test set", "test_set", set(settings)),
        ("examples", "examples", set(settings)),
        ("BERTScore model", "bertscore_model", with_bertscore),
    ]
    lines = []
    for label, key, runs in checks:
        stated = {run: s[key] for run, s in settings.items() if run in runs and s.get(key) is not None}
        if len({json.dumps(v, sort_keys=True) for v in stated.values()}) > 1:
            lines.append(
                f"{label}: "
                + "; ".join(f"{run}: {json.dumps(v, sort_keys=True)}" for run, v in stated.items())
            )
    return lines


def metric_names(records: list[dict[str, Any]]) -> list[str]:
    """The study's metrics in order, then any other metric some record has, sorted by name."""
    extra = sorted({name for r in records for name in r["metrics"]} - set(METRICS))
    return list(METRICS) + extra


def percent_change(value: float | None, base: float | None) -> float | None:
    """``100 * (value - base) / base``, or ``None`` when either is missing or ``base`` is 0."""
    if value is None or base is None or base == 0:
        return None
    return 100.0 * (value - base) / base


def _change_cell(percent: float | None, value: float | None, base: float | None) -> str:
    """A % change, or where the base is 0 (a % is undefined) the absolute difference, labelled."""
    if percent is not None:
        return f"{percent:+.2f}"
    if value is None or base is None:
        return ""
    difference = value - base
    return f"{difference:+,.0f} abs" if float(difference).is_integer() else f"{difference:+.4f} abs"


def format_row(values: list[float | None]) -> list[str]:
    """Table cells for one metric across runs, alike within the row: blank for missing; whole
    numbers with thousands separators when every value is whole; else 4 decimals, or 1 from 100 up
    (the CSV keeps full precision)."""
    present = [v for v in values if v is not None]
    if all(float(v).is_integer() for v in present):
        return ["" if v is None else f"{int(v):,}" for v in values]
    spec = ",.1f" if max(abs(v) for v in present) >= 100 else ".4f"
    return ["" if v is None else format(v, spec) for v in values]


# ----------------------------------------------------------------------------- tables


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join([" --- "] + [" ---: "] * (len(header) - 1)) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _csv_text(header: list[str], rows: list[list[Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([["" if v is None else v for v in row] for row in rows])
    return buffer.getvalue()


# ----------------------------------------------------------------------------- plots


def _metric_bars(runs: list[str], table: dict[str, list[float | None]]) -> plt.Figure:
    """One small bar chart per metric that any run has, one bar per run."""
    metrics = [m for m, values in table.items() if any(v is not None for v in values)]
    cols = min(4, max(1, len(metrics)))
    rows = max(1, math.ceil(len(metrics) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.9 * rows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    palette = [colors[i % len(colors)] for i in range(len(runs))]
    for ax, metric in zip(axes.flat, metrics):
        values = table[metric]
        positive = [v for v in values if v is not None and v > 0]
        if metric in _LOG_SCALE and positive:
            ax.set_yscale("log")  # a 0 (the untuned base) then draws no bar; its label still says 0
        bars = ax.bar(range(len(runs)), [v or 0.0 for v in values], color=palette)
        # value labels tell a 0 from a run that never computed the metric ("n/a", no bar)
        ax.bar_label(bars, labels=["n/a" if v is None else f"{v:.3g}" for v in values], fontsize=7, padding=1)
        if ax.get_yscale() == "log":
            ax.set_ylim(min(positive) / 3, max(positive) * 3)
            for bar, v in zip(bars, values):
                if not v:  # a label at y=0 would vanish on a log axis: put it on the floor
                    ax.annotate("n/a" if v is None else "0", (bar.get_x() + bar.get_width() / 2, min(positive) / 3),
                                ha="center", va="bottom", fontsize=7)  # fmt: skip
        else:
            ax.margins(y=0.15)
        ax.set_title(metric, fontsize=10)
        ax.set_xticks(range(len(runs)), runs, rotation=45, ha="right", fontsize=8)
        ax.tick_params(axis="y", labelsize=8)
    for ax in list(axes.flat)[len(metrics) :]:
        ax.set_visible(False)
    fig.tight_layout()
    return fig


def _params_vs_rouge(
    runs: list[str], params: list[float | None], rouge: list[float | None]
) -> plt.Figure | None:
    """Trainable parameters (log x) against ROUGE-L: a labelled point per run that trained some
    parameters, a dashed line per run that trained none (the untuned base: log 0 has no place)."""
    points = [(r, p, y) for r, p, y in zip(runs, params, rouge) if p is not None and p > 0 and y is not None]
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for run, p, y in points:
        ax.scatter(p, y, s=40)
        ax.annotate(run, (p, y), textcoords="offset points", xytext=(5, 4), fontsize=9)
    for run, p, y in zip(runs, params, rouge):
        if p == 0 and y is not None:
            ax.axhline(y, color="gray", linestyle="--", linewidth=1)
            ax.annotate(f"{run} (0 trainable)", (0.01, y), xycoords=("axes fraction", "data"),
                        textcoords="offset points", xytext=(0, 3), fontsize=9, color="gray")  # fmt: skip
    ax.set_xscale("log")
    ax.margins(x=0.25, y=0.15)
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel("ROUGE-L F1")
    ax.set_title("Trainable parameters vs ROUGE-L")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    return fig


def _png_bytes(fig: plt.Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


# ----------------------------------------------------------------------------- the report


def _sweep_plots(records: list[dict[str, Any]], out_dir: Path) -> dict[str, str]:
    """Links to the plots of the sweep each run's checkpoint comes from (a checkpoint under
    ``<sweep>/trial_<n>/``, next to which ``sweep`` wrote ``plots/``), by run."""
    links = {}
    for record in records:
        checkpoint = (record.get("settings") or {}).get("ckpt_path")
        trial = (
            next((p for p in Path(checkpoint).parents if re.fullmatch(r"trial_\d+", p.name)), None)
            if checkpoint
            else None
        )
        plots = sorted((trial.parent / "plots").glob("*.png")) if trial is not None else []
        if plots:
            links[record["run"]] = " · ".join(
                f"[{p.stem.replace('_', ' ')}]({os.path.relpath(p.resolve(), out_dir.resolve())})"
                for p in plots
            )
    return links


def write_report(
    records: list[dict[str, Any] | str | Path],
    out_dir: str | Path,
    base_run: str | None = None,
    allow_mixed: bool = False,
) -> dict[str, Path]:
    """Write the comparison of ``records`` to ``out_dir``.

    Args:
        records: Run records (dicts), ``eval_record.json`` files, or run directories holding one;
            the columns follow this order.
        out_dir: Where the report goes (created if needed).
        base_run: Name of the run that % changes are relative to (typically the untuned model);
            ``None`` writes no % change table.
        allow_mixed: Write the report of records scored on different test examples (or BERTScore
            models), marked as mixed, instead of refusing them.

    Returns:
        The written paths: ``markdown``, ``csv``, ``metrics_png``, ``tensorboard``, and
        ``change_csv`` (with a base run) and ``params_png`` (when some run has both trainable
        parameters and ROUGE-L).

    Raises:
        ValueError: No records, two records with the same run name, a malformed record, a
            ``base_run`` that is not among the runs, or records that do not compare (see
            ``differences``) without ``allow_mixed``.
    """
    loaded = [load_record(r) for r in records]
    if not loaded:
        raise ValueError("write_report needs at least one run record")
    runs = [r["run"] for r in loaded]
    duplicates = sorted({r for r in runs if runs.count(r) > 1})
    if duplicates:
        raise ValueError(f"run names must be unique; repeated: {duplicates}")
    if base_run is not None and base_run not in runs:
        raise ValueError(f"base run {base_run!r} not found; the runs are {runs}")
    mixed = differences(loaded)
    if mixed and not allow_mixed:
        raise ValueError(
            "the records were not scored alike, so their numbers and changes do not compare:\n  "
            + "\n  ".join(mixed)
            + "\nEvaluate them on the same test examples (and BERTScore model), "
            "or pass --allow_mixed true to write the report marked as mixed"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    metrics = metric_names(loaded)
    table = {m: [r["metrics"].get(m) for r in loaded] for m in metrics}
    written: dict[str, Path] = {}

    written["csv"] = out_dir / "metrics.csv"
    write_atomically(written["csv"], _csv_text(["metric", *runs], [[m, *table[m]] for m in metrics]))
    md_metrics = _markdown_table(["metric", *runs], [[m, *format_row(table[m])] for m in metrics])

    md_change = None
    if base_run is not None:
        others = [r for r in runs if r != base_run]
        b = runs.index(base_run)
        change = {m: [percent_change(table[m][runs.index(r)], table[m][b]) for r in others] for m in metrics}
        written["change_csv"] = out_dir / "change.csv"
        header = [f"% change vs {base_run}" + (" (mixed records)" if mixed else ""), *others]
        write_atomically(written["change_csv"], _csv_text(header, [[m, *change[m]] for m in metrics]))
        cells = [
            [m, *(_change_cell(v, table[m][runs.index(r)], table[m][b]) for v, r in zip(change[m], others))]
            for m in metrics
        ]
        md_change = _markdown_table(["metric", *others], cells)

    figures = {"metrics_png": ("metrics.png", _metric_bars(runs, table))}
    params_fig = _params_vs_rouge(runs, table["trainable_params"], table["rougeL"])
    if params_fig is not None:
        figures["params_png"] = ("params_vs_rougeL.png", params_fig)
    for key, (name, fig) in figures.items():
        written[key] = out_dir / name
        write_atomically(written[key], _png_bytes(fig))

    sections = ["# Results\n"]
    if mixed:
        sections += [
            "**Mixed records** (written with allow_mixed): the runs were not scored alike, so their "
            "numbers do not compare:\n",
            *(f"- {line}\n" for line in mixed),
        ]
    sections += ["## Metrics\n", md_metrics]
    if any(table.get(m) and any(v is not None for v in table[m]) for m in STORED):
        sections += [CONVENTIONS]
    pending = [f"`{r['run']}` ({', '.join(r['pending'])})" for r in loaded if r.get("pending")]
    if pending:
        sections += [
            "Evaluations not finished, their blank cells still to compute (rerun `evaluate` with "
            f"`--resume true`): {', '.join(pending)}.\n"
        ]
    if md_change is not None:
        sections += [f"## Change vs `{base_run}` (%)" + (" (mixed records)" if mixed else "") + "\n",
                     "100 * (run - base) / base; where the base is 0, the absolute difference run - base, marked "
                     "*abs*; blank where either is missing.\n", md_change]  # fmt: skip
    sections += ["## Plots\n", *(f"![{name}]({name})\n" for name, _ in figures.values())]
    sweeps = _sweep_plots(loaded, out_dir)
    if sweeps:
        sections += ["## Sweeps\n", "The searches the runs' checkpoints came from, and their plots:\n",
                     *(f"- `{run}`: {links}\n" for run, links in sweeps.items())]  # fmt: skip
    settings = "".join(
        f"- `{r['run']}`: `{json.dumps(r.get('settings', {}), sort_keys=True)}`\n" for r in loaded
    )
    sections += ["## Settings\n", settings]
    written["markdown"] = out_dir / "report.md"
    write_atomically(written["markdown"], "\n".join(sections))

    written["tensorboard"] = _write_tensorboard(
        out_dir / "tensorboard", runs, table, md_metrics, md_change, figures
    )
    return written


def _write_tensorboard(
    log_dir: Path,
    runs: list[str],
    table: dict[str, list[float | None]],
    md_metrics: str,
    md_change: str | None,
    figures: dict[str, tuple[str, plt.Figure]],
) -> Path:
    """Scalars per run under ``runs/<run>`` (TensorBoard overlays runs per metric), the tables
    and figures under ``summary``. Replaces what an earlier report left there."""
    from torch.utils.tensorboard import SummaryWriter

    if log_dir.exists():
        shutil.rmtree(log_dir)
    for i, run in enumerate(runs):
        with SummaryWriter(log_dir / "runs" / _safe_name(run)) as writer:
            for metric, values in table.items():
                if values[i] is not None:
                    writer.add_scalar(f"metrics/{metric}", values[i], 0)
    with SummaryWriter(log_dir / "summary") as writer:
        writer.add_text("metrics", md_metrics, 0)
        if md_change is not None:
            writer.add_text("change", md_change, 0)
        for name, fig in figures.values():
            writer.add_figure(name.removesuffix(".png"), fig, 0)  # closes the figure
    return log_dir


def _safe_name(run: str) -> str:
    return re.sub(r"[^\w.-]+", "_", run) or "_"


def report(
    records: list[str] | None = None,
    out_dir: str = "runs/report",
    base_run: str | None = None,
    allow_mixed: bool = False,
) -> None:
    """Tables (Markdown, CSV), % change against ``base_run`` and plots from evaluation records.

    Args:
        records: ``eval_record.json`` files or the run directories holding them.
        out_dir: where report.md, metrics.csv, change.csv and the PNGs go.
        base_run: the run (by name) the % change table compares against.
        allow_mixed: report records scored on different test examples (another test set, split
            or number of examples) or BERTScore models, marked as mixed; by default they are refused.
    """
    if not records:
        raise ValueError("--records is required: a list of eval_record.json files or run directories")
    written = write_report(records, out_dir, base_run=base_run, allow_mixed=allow_mixed)
    print(Path(written["markdown"]).read_text() if "markdown" in written else written)

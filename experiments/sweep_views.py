"""What a sweep is looked at with, made offline from its study database and its trials' runs.

``plots/`` next to ``trials.md`` (PNG, matplotlib; finished trials: complete ones coloured by the
objective, pruned ones grey and dashed at their last reported value, failed ones red below the
objective's axis, since they have none):

    parallel_coordinates.png   every swept option and the objective, one line per trial
    importances.png            each option's share of the objective's variance (fANOVA, the
                               evaluator named in the title), from the complete trials
    history.png                the objective by trial number and the best so far
    slice_<option>.png         the objective against one option's values

A choice is shown by its value's name (``q,v`` for ``[q, v]``), a numeric range on its own scale.

TensorBoard's HParams view: each trial's run (``<sweep>/trial_<n>``, where Lightning's
TensorBoardLogger writes its curves) gets the trial's values, its state and its best objective
(``sweep/best_<objective>``) as an HParams session, and the sweep's directory the experiment that
lists the options and metrics, so ``tensorboard --logdir runs/sweeps/<name>`` shows the table and
the parallel coordinates across trials beside their validation curves.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import optuna
from optuna.trial import FrozenTrial

from peftcore.files import write_atomically

IMPORTANCE_EVALUATOR = "fANOVA (optuna.importance.FanovaImportanceEvaluator, seed 0)"
STYLES = {
    "complete": {"marker": "o"},
    "pruned": {"color": "0.55", "linestyle": "--", "marker": "x"},
    "failed": {"color": "tab:red", "linestyle": ":", "marker": "v"},
}


def label(value: Any) -> str:
    """A choice as people read it: ``[q, v]`` -> ``q,v``; numbers and strings as they are."""
    if isinstance(value, list):
        return ",".join(label(v) for v in value)
    if value is None:
        return "null"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def slug(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", key).strip("_")


class Axis:
    """One swept option (or the objective) on a plot: positions and tick labels."""

    def __init__(self, key: str, choices: list | None, log: bool, values: list) -> None:
        self.key, self.log = key, log
        self.choices = [label(c) for c in choices] if choices is not None else None
        numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if self.choices is None and numbers:
            self.low, self.high = min(numbers), max(numbers)
        else:
            self.low, self.high = 0.0, 1.0

    def place(self, value: Any) -> float | None:
        """The value at [0, 1] along the axis; None for a value it does not hold (a trial of an
        earlier space, a trial that failed before it drew every value)."""
        if self.choices is not None:
            if label(value) not in self.choices:
                return None
            index = self.choices.index(label(value))
            return index / (len(self.choices) - 1) if len(self.choices) > 1 else 0.5
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None
        low, high, v = self.low, self.high, float(value)
        if self.log and low > 0:
            low, high, v = math.log(low), math.log(high), math.log(v)
        return (v - low) / (high - low) if high > low else 0.5

    def ticks(self) -> tuple[list[float], list[str]]:
        if self.choices is not None:
            return [self.place(c) for c in self.choices], self.choices
        if self.high == self.low:
            return [0.5], [f"{self.low:.3g}"]
        return [0.0, 1.0], [f"{self.low:.3g}", f"{self.high:.3g}"]


def _finished(study: optuna.Study, outcome) -> list[tuple[FrozenTrial, str, float | None]]:
    """(trial, complete | pruned | failed, objective or None) of the trials that count."""
    rows = []
    for trial in study.get_trials(deepcopy=False):
        state = outcome(trial)
        if state not in STYLES:
            continue
        value = trial.value if state == "complete" else None
        if state == "pruned" and trial.intermediate_values:
            value = trial.intermediate_values[max(trial.intermediate_values)]
        rows.append((trial, state, value))
    return rows


def _worse_side(rows, maximize: bool) -> float:
    """Where trials without a value (failed) sit: past the worst value, visibly apart."""
    values = [v for _, _, v in rows if v is not None]
    if not values:
        return 0.0
    span = (max(values) - min(values)) or max(abs(max(values)), 1e-3)
    return min(values) - 0.15 * span if maximize else max(values) + 0.15 * span


def write_plots(study: optuna.Study, params: list, out: Path, objective: str, outcome) -> dict[str, Path]:
    """The PNGs above into ``out/plots``; returns them by name. ``params`` are the sweep's Params,
    ``outcome`` its function naming a trial's state."""
    rows = _finished(study, outcome)
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    axes = [
        Axis(p.key, p.choices, p.log, [t.user_attrs.get("values", {}).get(p.key) for t, _, _ in rows])
        for p in params
    ]
    counts = {s: sum(1 for _, state, _ in rows if state == s) for s in STYLES}
    summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    figures = {
        "parallel_coordinates": _parallel(rows, axes, objective, f"{study.study_name}: {summary}", maximize),
        "importances": _importances(study, params, rows, objective),
        "history": _history(rows, objective, maximize, study.study_name),
        **{f"slice_{slug(axis.key)}": _slice(rows, axis, objective, maximize) for axis in axes},
    }
    written = {}
    for name, figure in figures.items():
        written[name] = plots / f"{name}.png"
        write_atomically(written[name], lambda tmp, f=figure: f.savefig(tmp, format="png", dpi=110))
        plt.close(figure)
    return written


def _objective_axis(rows, objective: str) -> Axis:
    values = [v for _, _, v in rows if v is not None]
    return Axis(objective, None, False, values or [0.0])


def _parallel(rows, axes: list[Axis], objective: str, title: str, maximize: bool):
    """The objective's axis has the better values at the top (minimising: the lowest); failed
    trials sit below it, on the worse side."""
    score = _objective_axis(rows, objective)
    columns = [*axes, score]
    figure, ax = plt.subplots(figsize=(max(6.0, 2.2 * len(columns)), 4.8))
    cmap = plt.get_cmap("viridis" if maximize else "viridis_r")

    def height(value: float) -> float:
        return score.place(value) if maximize else 1 - score.place(value)

    unplaced = 0
    for trial, state, value in rows:
        values = trial.user_attrs.get("values", {})
        ys = [axis.place(values.get(axis.key)) for axis in axes]
        if None in ys:  # a trial without a value this space holds: no line to draw
            unplaced += 1
            continue
        ys.append(height(value) if value is not None else -0.12)
        style = dict(STYLES[state])
        if state == "complete":
            style["color"] = cmap(score.place(value))
        ax.plot(range(len(columns)), ys, linewidth=1.6, alpha=0.9, markersize=5, **style)
    if unplaced:
        title += f"; {unplaced} without a value for every option, not drawn"
    for i, axis in enumerate(columns):
        ax.axvline(i, color="0.8", linewidth=1, zorder=0)
        positions, names = axis.ticks()
        if axis is score and not maximize:
            positions = [1 - p for p in positions]
        for y, name in zip(positions, names):
            ax.annotate(name, (i, y), xytext=(4, 0), textcoords="offset points", fontsize=8, va="center")
    if any(state == "failed" for _, state, _ in rows):
        ax.annotate("failed", (len(columns) - 1, -0.12), xytext=(4, 0), textcoords="offset points",
                    fontsize=8, color="tab:red", va="center")  # fmt: skip
    ax.set_xticks(range(len(columns)), [_short(axis.key) for axis in columns], fontsize=9)
    ax.set_yticks([])
    ax.set_ylim(-0.2, 1.08)
    ax.set_xlim(-0.2, len(columns) - 0.4)
    ax.set_title(f"Parallel coordinates ({title})", fontsize=10)
    _legend(ax, rows)
    colours = plt.cm.ScalarMappable(cmap=cmap, norm=matplotlib.colors.Normalize(score.low, score.high))
    figure.colorbar(colours, ax=ax, label=f"{objective} (complete trials)", pad=0.01)
    figure.tight_layout()
    return figure


def _importances(study: optuna.Study, params: list, rows, objective: str):
    figure, ax = plt.subplots(figsize=(7, 0.6 * len(params) + 1.8))
    complete = [t for t, state, _ in rows if state == "complete"]
    title = f"Importance for {objective} ({len(complete)} complete trials)\nevaluator: {IMPORTANCE_EVALUATOR}"
    varied = [p.key for p in params if len({json.dumps(t.params.get(p.key)) for t in complete}) > 1]
    why = None
    if len(complete) < 2 or not varied:
        why = "needs at least 2 complete trials that differ in some option"
    else:
        try:
            evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
            result = optuna.importance.get_param_importances(study, evaluator=evaluator, params=varied)
        except (RuntimeError, ValueError) as err:
            same = len({v for _, state, v in rows if state == "complete"}) == 1
            why = (f"every complete trial scored the same {objective} " if same else "") + f"({err})"
    if why is not None:
        ax.text(0.5, 0.5, f"no importances: {why}", ha="center", va="center", wrap=True)
        ax.set_axis_off()
    else:
        names = list(result)[::-1]
        ax.barh([_short(n) for n in names], [result[n] for n in names], color="tab:blue")
        ax.set_xlabel("share of the objective's variance")
        ax.set_xlim(0, 1)
    ax.set_title(title, fontsize=9)
    figure.tight_layout()
    return figure


def _history(rows, objective: str, maximize: bool, name: str):
    figure, ax = plt.subplots(figsize=(7, 4.2))
    _scatter(ax, rows, lambda trial: trial.number, _worse_side(rows, maximize))
    complete = sorted((t.number, v) for t, s, v in rows if s == "complete")
    best, line = None, []
    for number, value in complete:
        better = max if maximize else min
        best = value if best is None else better(best, value)
        line.append((number, best))
    if line:
        ax.step(
            [x for x, _ in line], [y for _, y in line], where="post", color="tab:orange", label="best so far"
        )
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("trial")
    ax.set_ylabel(objective)
    ax.set_title(f"Optimization history: {name} (failed trials, without a value, past the worst)", fontsize=9)
    ax.legend(fontsize=8)
    figure.tight_layout()
    return figure


def _slice(rows, axis: Axis, objective: str, maximize: bool):
    figure, ax = plt.subplots(figsize=(6, 4))

    def place(trial: FrozenTrial) -> float | None:
        return axis.place(trial.user_attrs.get("values", {}).get(axis.key))

    _scatter(ax, rows, place, _worse_side(rows, maximize))
    positions, names = axis.ticks()
    ax.set_xticks(positions, names, fontsize=8, rotation=20 if axis.choices else 0)
    ax.set_xlim(-0.1, 1.1)
    ax.set_xlabel(axis.key + (" (log scale)" if axis.log else ""))
    ax.set_ylabel(objective)
    ax.set_title(f"{objective} against {axis.key}", fontsize=9)
    ax.legend(fontsize=8)
    figure.tight_layout()
    return figure


def _scatter(ax, rows, x_of, worse: float) -> None:
    """One marker per trial at (``x_of(trial)``, its objective), by state; failed trials, without
    a value, at ``worse``; trials ``x_of`` cannot place (None) left out."""
    for state in STYLES:
        points = [(x_of(t), v) for t, s, v in rows if s == state]
        points = [(x, v) for x, v in points if x is not None]
        if points:
            xs, ys = [x for x, _ in points], [v if v is not None else worse for _, v in points]
            color = STYLES[state].get("color", "tab:blue")
            ax.scatter(xs, ys, label=state, color=color, marker=STYLES[state]["marker"], zorder=3)


def _legend(ax, rows) -> None:
    states = sorted({state for _, state, _ in rows}, key=list(STYLES).index)
    handles = [plt.Line2D([], [], **{"color": "tab:green", **STYLES[s]}, label=s) for s in states]
    handles = [h if h.get_label() != "complete" else plt.Line2D([], [], marker="o", color="tab:green",
               label="complete (colour: objective)") for h in handles]  # fmt: skip
    ax.legend(
        handles=handles, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.09), ncol=3, frameon=False
    )


def _short(key: str) -> str:
    """``model.peft.init_args.r`` -> ``peft.r``: the option without the config's scaffolding."""
    return key.replace("model.", "").replace("init_args.", "").replace("optimizer.", "opt.")


# --- TensorBoard's HParams ----------------------------------------------------------------------


def best_tag(objective: str) -> str:
    return "sweep/best_" + slug(objective)


def _hparam_value(value: Any) -> str | float | bool:
    if isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, float)):
        return float(value)
    return label(value)


def write_hparams_experiment(sweep_dir: Path, params: list, objective: str) -> None:
    """The experiment (its options with their choices, its metrics) in the sweep's directory."""
    from torch.utils.tensorboard.summary import hparams
    from torch.utils.tensorboard.writer import FileWriter

    values = {p.key: _hparam_value(p.candidates()[0]) for p in params}
    domains = {
        p.key: [_hparam_value(c) for c in p.choices]
        for p in params
        if p.choices is not None and all(isinstance(_hparam_value(c), str) for c in p.choices)
    }
    metrics = {best_tag(objective): 0.0, objective: 0.0, "val/loss": 0.0}
    experiment, _, _ = hparams({**values, "trial_state": "complete"}, metrics, hparam_domain_discrete={
        **domains, "trial_state": ["complete", "pruned", "failed"]})  # fmt: skip
    writer = FileWriter(str(sweep_dir))
    writer.add_summary(experiment)
    writer.close()


SESSION_SUFFIX = ".sweep_hparams"  # the events file holding a trial's session: written once


def write_hparams_session(
    trial_dir: Path, values: dict, state: str, best: float | None, objective: str, started: float
) -> None:
    """One trial's session in its run: its values, its state, its best objective (once: a trial
    that has one keeps it; ``started``, the trial's start time, tells it from an earlier study's
    trial of the same number in the same directory)."""
    suffix = f"{SESSION_SUFFIX}_{int(started)}"
    if trial_dir.is_dir() and any(trial_dir.glob(f"*{suffix}")):
        return
    from tensorboard.plugins.hparams.api_pb2 import Status
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData, SessionEndInfo
    from torch.utils.tensorboard.summary import hparams, scalar
    from torch.utils.tensorboard.writer import FileWriter

    hparam_values = {key: _hparam_value(value) for key, value in values.items()}
    _, start, end = hparams({**hparam_values, "trial_state": state}, {})
    if state == "failed":  # torch's helper ends every session in success
        content = HParamsPluginData(
            session_end_info=SessionEndInfo(status=Status.Value("STATUS_FAILURE")), version=0
        )
        end.value[0].metadata.plugin_data.content = content.SerializeToString()
    writer = FileWriter(str(trial_dir), filename_suffix=suffix)
    writer.add_summary(start)
    if best is not None:
        writer.add_summary(scalar(best_tag(objective), best), global_step=0)
    writer.add_summary(end)
    writer.close()

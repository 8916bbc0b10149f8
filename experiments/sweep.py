"""``python -m experiments sweep --config experiments/sweeps/lora.yaml``: a hyperparameter search.

A sweep file names a base ``fit`` config and a search space over any ``fit`` option, by its
dotted key; each trial is an ordinary ``fit`` run of the base config with one point of the space:

    base_config: experiments/configs/lora.yaml
    n_trials: 11
    sampler: random                 # random (the study's) | grid | tpe
    pruner: none                    # none | median | hyperband (on the per-epoch objective)
    objective: val/rougeL           # a validation metric, maximised by default
    space:
      model.lr: {choices: [5.0e-4, 1.0e-4, 1.0e-3]}
      model.weight_decay: {low: 0.0, high: 0.1}                  # uniform
      model.warmup_ratio: {low: 0.01, high: 0.2, log: true}      # log-uniform
      model.peft.init_args.r: {low: 4, high: 32, int: true}      # integers (step, log allowed)
      model.peft.init_args.target_modules: {choices: [[q, v], [q, k, v, o, wi, wo]]}

Optuna runs it on a storage: by default the SQLite file ``<output_dir>/<study_name>.db`` (an
interrupted sweep resumes where it stopped: finished trials are kept, and a new trial takes the
place of the one in flight), or any database URL Optuna accepts, so that several processes or machines run workers
on one sweep. The space is checked before any trial starts: an unknown key, empty choices or a
value the config refuses is an error. A trial that fails (a NaN loss, out of memory, a
combination that does not build) is recorded with its error and the sweep goes on. Each trial
writes its run to ``<output_dir>/<study_name>/trial_<n>/`` (TensorBoard, config, checkpoints);
the sweep ends with ``trials.md`` / ``trials.csv`` (sorted by the objective) and ``best.yaml``,
the best trial's full config, ready for ``python -m experiments fit --config``.
``optuna-dashboard <storage URL>`` shows the study live.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import optuna
import sqlalchemy.exc
import yaml
from lightning.pytorch.callbacks import Callback

from peftcore.files import write_atomically

PRIMITIVES = (type(None), bool, int, float, str)
COUNTED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


@dataclass(frozen=True)
class Param:
    """One dimension of the space: ``choices``, or a range ``low``..``high`` (``log`` for
    log-uniform, ``int`` for integers, ``step`` for a grid of values in it)."""

    key: str
    choices: Optional[list] = None
    low: Optional[float] = None
    high: Optional[float] = None
    log: bool = False
    int: bool = False
    step: Optional[float] = None

    @classmethod
    def parse(cls, key: str, spec: object) -> "Param":
        if not isinstance(spec, dict):
            raise ValueError(f"space[{key!r}] must be {{choices: [...]}} or {{low: ..., high: ...}}, got {spec!r}")
        unknown = set(spec) - {"choices", "low", "high", "log", "int", "step"}
        if unknown:
            raise ValueError(f"space[{key!r}] has {sorted(unknown)}; a dimension takes choices, or low, high, log, int, step")
        param = cls(key, **spec)
        if param.choices is not None:
            if not isinstance(param.choices, list) or not param.choices:
                raise ValueError(f"space[{key!r}].choices must be a non-empty list, got {param.choices!r}")
            if param.low is not None or param.high is not None:
                raise ValueError(f"space[{key!r}] gives both choices and a range; give one")
        elif param.low is None or param.high is None or not param.low < param.high:
            raise ValueError(f"space[{key!r}] needs choices, or low < high (got low={param.low}, high={param.high})")
        elif param.log and param.low <= 0:
            raise ValueError(f"space[{key!r}] is log-uniform, so low must be > 0 (got {param.low})")
        return param

    def candidates(self) -> list:
        """The values to check the space with: every choice, or both ends of the range."""
        if self.choices is not None:
            return list(self.choices)
        return [int(self.low), int(self.high)] if self.int else [self.low, self.high]

    def encoded(self) -> list:
        """Optuna's categorical values are primitives; a list choice travels as its JSON text."""
        return [c if isinstance(c, PRIMITIVES) else json.dumps(c) for c in self.choices]

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.choices is not None:
            value = trial.suggest_categorical(self.key, self.encoded())
            return self.choices[self.encoded().index(value)]
        if self.int:
            return trial.suggest_int(self.key, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, step=self.step, log=self.log)


class TrialReporter(Callback):
    """Reports the objective to Optuna after each validation, prunes when the pruner says so, and
    stops a trial whose training loss is not finite."""

    def __init__(self, trial: optuna.Trial, objective: str, maximize: bool) -> None:
        self.trial, self.objective, self.maximize = trial, objective, maximize
        self.best: Optional[float] = None

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        loss = float(outputs["loss"])
        if not math.isfinite(loss):
            raise FloatingPointError(f"the training loss is {loss} at step {trainer.global_step}")

    def on_validation_end(self, trainer, module) -> None:
        if trainer.sanity_checking:
            return
        if self.objective not in trainer.callback_metrics:
            raise ValueError(f"objective {self.objective!r} was not logged; the metrics are {sorted(trainer.callback_metrics)}")
        value = float(trainer.callback_metrics[self.objective])
        if not math.isfinite(value):
            raise FloatingPointError(f"{self.objective} is {value} at epoch {trainer.current_epoch}")
        if self.best is None or (value > self.best if self.maximize else value < self.best):
            self.best = value
        self.trial.report(value, step=trainer.current_epoch)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned at epoch {trainer.current_epoch}: {self.objective}={value:.4f}")


def sweep(
    base_config: Optional[str] = None,
    space: Optional[dict[str, dict]] = None,
    study_name: str = "sweep",
    n_trials: int = 11,
    sampler: Literal["random", "grid", "tpe"] = "random",
    seed: int = 0,
    pruner: Literal["none", "median", "hyperband"] = "none",
    objective: str = "val/rougeL",
    direction: Literal["maximize", "minimize"] = "maximize",
    storage: Optional[str] = None,
    output_dir: str = "runs/sweeps",
    overrides: Optional[list[str]] = None,
) -> dict:
    """Run (or resume) a search over ``space`` until ``n_trials`` trials have finished.

    Args:
        base_config: the ``fit`` config every trial starts from.
        space: ``{dotted fit option: {choices: [...]} | {low, high, log, int, step}}``.
        study_name: the study's name in the storage, and its directory under output_dir.
        n_trials: trials to finish (completed, pruned or failed with an error), all workers together.
        sampler: ``random`` (the study's), ``grid`` (every combination of choices) or ``tpe``.
        seed: the sampler's seed.
        pruner: ``none``, ``median`` or ``hyperband``, on the per-epoch objective.
        objective: the validation metric each trial is scored by (its best epoch counts).
        direction: ``maximize`` or ``minimize`` the objective.
        storage: an Optuna database URL; default ``sqlite:///<output_dir>/<study_name>.db``.
        output_dir: where the storage, the trials' runs and the results go.
        overrides: fixed ``fit`` options for every trial, e.g. ``["--trainer.max_epochs=2"]``.
    """
    if not base_config or not space:
        raise ValueError("a sweep needs base_config (a fit config) and a space (at least one dotted option)")
    if n_trials < 1:
        raise ValueError(f"n_trials must be a positive integer, got {n_trials}")
    params = [Param.parse(key, spec) for key, spec in space.items()]
    fixed = list(overrides or [])
    base = check_space(base_config, fixed, params)
    if sampler == "grid":
        if any(p.choices is None for p in params):
            raise ValueError("the grid sampler needs choices for every key; " + ", ".join(p.key for p in params if p.choices is None) + " is a range")
        n_trials = min(n_trials, math.prod(len(p.choices) for p in params))

    root = Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(
        storage=_storage(storage or f"sqlite:///{(root / f'{study_name}.db').resolve()}"),
        study_name=study_name, direction=direction, load_if_exists=True, pruner=_pruner(pruner, base),
    )
    study.sampler = _sampler(sampler, params, seed + len(study.trials))  # a resumed search draws new points
    optuna.storages.fail_stale_trials(study)  # a worker that died mid-trial: that trial is run again

    def run(trial: optuna.Trial) -> float:
        return _run_trial(trial, base_config, fixed, params, study_name, root, objective, direction)

    while len(_finished(study)) < n_trials:
        study.optimize(run, n_trials=1, catch=(Exception,))
    return write_results(study, params, base_config, fixed, root / study_name, objective)


def _finished(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Trials that count towards n_trials: completed, pruned, or failed with an error (a trial
    interrupted by Ctrl-C or a dead worker is not finished: it runs again)."""
    return [t for t in study.trials if t.state in COUNTED or (t.state.name == "FAIL" and "error" in t.user_attrs)]


def _run_trial(trial, base_config, fixed, params, study_name, root, objective, direction) -> float:
    from experiments.cli import lightning_cli

    values = {p.key: p.suggest(trial) for p in params}
    args = ["--config", base_config, *fixed, *(f"--{k}={json.dumps(v)}" for k, v in values.items()),
            f"--trainer.logger.init_args.save_dir={root}", f"--trainer.logger.init_args.name={study_name}",
            f"--trainer.logger.init_args.version=trial_{trial.number}"]
    trial.set_user_attr("values", values)
    trial.set_user_attr("worker", os.getpid())
    trial.set_user_attr("run_dir", str(root / study_name / f"trial_{trial.number}"))
    try:
        cli = lightning_cli(args, run=False, exit_on_error=False)
        reporter = TrialReporter(trial, objective, direction == "maximize")
        cli.trainer.callbacks.append(reporter)
        cli.trainer.fit(cli.model, cli.datamodule)
    except optuna.TrialPruned:
        raise
    except (KeyboardInterrupt, SystemExit):
        # Not finished: mark it failed now (Optuna leaves it running), and a resumed sweep runs a new trial.
        trial.set_user_attr("interrupted", True)
        trial.study.tell(trial, state=optuna.trial.TrialState.FAIL)
        raise
    except Exception as err:
        trial.set_user_attr("error", f"{type(err).__name__}: {err}"[:2000])
        raise
    if reporter.best is None:
        trial.set_user_attr("error", f"no validation ran, so {objective!r} was never measured")
        raise RuntimeError(trial.user_attrs["error"])
    return reporter.best


def check_space(base_config: str, fixed: list[str], params: list[Param]) -> dict:
    """Refuse a space that cannot run before any trial starts: every key must be a fit option
    and every candidate value one that option (and, for the method's fields, its config) accepts.
    Returns the base config as the CLI parses it."""
    base = _parsed([*_config_args(base_config), *fixed], "the base config with overrides")
    first = [f"--{p.key}={json.dumps(p.candidates()[0])}" for p in params]
    _parsed([*_config_args(base_config), *fixed, *first], "the space")  # unknown keys, types
    peft = base.get("model", {}).get("peft") or {}
    cls = config_class(peft["class_path"]) if peft.get("class_path") else None
    for p in params:
        field = p.key.removeprefix("model.peft.init_args.")
        for value in p.candidates():
            if field != p.key and cls is not None:
                try:
                    cls(**{**(peft.get("init_args") or {}), field: value})
                except (TypeError, ValueError) as err:
                    raise ValueError(f"space[{p.key!r}] value {value!r} is refused: {err}") from None
            elif value != p.candidates()[0]:
                _parsed([*_config_args(base_config), *fixed, f"--{p.key}={json.dumps(value)}"], f"space[{p.key!r}]={value!r}")
    return base


def _config_args(base_config: str) -> list[str]:
    return ["--config", base_config]


def config_class(class_path: str) -> type:
    from experiments.cli import config_class as resolve

    return resolve(class_path)


def _parsed(args: list[str], what: str) -> dict:
    """The fit config that ``args`` give, parsed and printed by the CLI without building anything."""
    from experiments.cli import lightning_cli

    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            lightning_cli([*args, "--print_config"], run=False, exit_on_error=False)
    except SystemExit as done:
        if done.code not in (0, None):
            raise
    except argparse.ArgumentError as err:
        raise ValueError(f"{what} does not parse: {err}") from None
    return yaml.safe_load(out.getvalue())


def _storage(url: str) -> optuna.storages.BaseStorage:
    """An RDB storage with heartbeats, so a worker that dies leaves a trial others can tell is stale.

    Workers started together on a new database race to create its schema: the losers' CREATE
    TABLE or schema-version insert fails, and a second look finds the schema the winner made.
    """
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
    for attempt in range(5):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=engine, heartbeat_interval=30, grace_period=90)
        except sqlalchemy.exc.DBAPIError as err:
            lost_the_race = isinstance(err, sqlalchemy.exc.IntegrityError) or "already exists" in str(err)
            if not lost_the_race or attempt == 4:
                raise
            time.sleep(0.2 * (attempt + 1))


def _sampler(name: str, params: list[Param], seed: int) -> optuna.samplers.BaseSampler:
    if name == "grid":
        return optuna.samplers.GridSampler({p.key: p.encoded() for p in params}, seed=seed)
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    return optuna.samplers.RandomSampler(seed=seed)


def _pruner(name: str, base: dict) -> optuna.pruners.BasePruner:
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    if name == "hyperband":
        epochs = (base.get("trainer") or {}).get("max_epochs") or "auto"
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=epochs)
    return optuna.pruners.NopPruner()


def write_results(study: optuna.Study, params: list[Param], base_config: str, fixed: list[str], out: Path,
                  objective: str) -> dict:
    """trials.md / trials.csv sorted by the objective, and best.yaml: the best trial's config."""
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    trials = sorted(_finished(study), key=lambda t: (t.value is None, -(t.value or 0) if maximize else (t.value or 0)))
    header = ["trial", "state", objective, *(p.key for p in params), "run or error"]
    rows = [[t.number, t.state.name.lower(), "" if t.value is None else round(t.value, 4),
             *(json.dumps(t.user_attrs.get("values", {}).get(p.key)) for p in params),
             t.user_attrs.get("error") or t.user_attrs.get("run_dir", "")] for t in trials]
    table = "| " + " | ".join(header) + " |\n|" + " --- |" * len(header) + "\n"
    table += "".join("| " + " | ".join(str(c).replace("|", "/") for c in row) + " |\n" for row in rows)
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows([header, *rows])
    write_atomically(out / "trials.md", f"# Sweep {study.study_name}: {objective}\n\n{table}")
    write_atomically(out / "trials.csv", buffer.getvalue())
    print(table)
    completed = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    result = {"study": study.study_name, "trials": len(trials), "table": str(out / "trials.md")}
    if completed:
        best = completed[0]
        values = best.user_attrs["values"]
        config = _parsed([*_config_args(base_config), *fixed, *(f"--{k}={json.dumps(v)}" for k, v in values.items())],
                         "the best trial's config")
        header_line = f"# The best trial of sweep {study.study_name!r}: trial {best.number}, {objective} = {best.value:.4f}\n"
        write_atomically(out / "best.yaml", header_line + yaml.safe_dump(config, sort_keys=False))
        result.update(best_trial=best.number, best_value=best.value, best_values=values,
                      best_run=best.user_attrs["run_dir"], best_config=str(out / "best.yaml"))
        print(f"best: trial {best.number}, {objective} = {best.value:.4f}; config: {out / 'best.yaml'}")
    write_atomically(out / "result.json", json.dumps(result, indent=2) + "\n")
    return result


def sweep_cli(argv: list[str]) -> None:
    from jsonargparse import CLI

    try:
        CLI(sweep, args=argv)
    except ValueError as err:  # a bad space or file: the message, not a traceback
        raise SystemExit(f"error: {err}") from None

"""``python -m experiments sweep --config experiments/sweeps/lora.yaml``: a hyperparameter search.

A sweep file names a base ``fit`` config and a search space over any ``fit`` option, by its
dotted key; each trial is an ordinary ``fit`` run of the base config with one point of the space:

    base_config: experiments/configs/lora.yaml
    n_trials: 11
    sampler: random                 # random (the study's) | grid | tpe
    pruner: none                    # none | median | hyperband (on the per-epoch objective)
    objective: val/rougeL           # a validation metric, maximised by default
    space:
      model.optimizer.lr: {choices: [5.0e-4, 1.0e-4, 1.0e-3]}
      model.optimizer.weight_decay: {low: 0.0, high: 0.1}                  # uniform
      model.optimizer.warmup_ratio: {low: 0.01, high: 0.2, log: true}      # log-uniform
      model.peft.init_args.r: {low: 4, high: 32, int: true}      # integers (step, log allowed)
      model.peft.init_args.target_modules: {choices: [[q, v], [q, k, v, o, wi, wo]]}

Checked before any trial starts (an error, exit status 1): the objective must be a metric the
model logs in validation (``val/loss``; ``val/rouge1|rouge2|rougeL|rougeLsum`` when it generates
in validation) in the direction that makes sense; every key must be a fit option; and every value
of the space (each choice, both ends of a range) must pass the config's parsing, the method
config's checks, the data module's and the model's own checks of their settings (those it makes
before it builds the network): ``data.batch_size: 0`` or ``model.optimizer.lr: 0`` is refused, not found by a
trial. What only building shows (a target name no module has) fails that trial.

Optuna runs it on a storage: by default the SQLite file ``<output_dir>/<study_name>.db``, or any
database URL Optuna accepts, so that several processes or machines run workers on one sweep.
Together they finish exactly ``n_trials`` trials: a worker starts a trial only while the finished
and running ones fall short, and a trial that finds others started first and enough is skipped
before it trains. An interrupted sweep resumes where it stopped: finished trials are kept; the
trial a Ctrl-C interrupted, or whose worker died (found at once for a dead process on this
machine, after the heartbeat's grace period for another machine), does not count, and on a grid
its point runs again (every point exactly once) while another sampler draws a new one. A trial
that fails (a NaN loss, out of memory, a combination that does not build) is recorded with its
error and the sweep goes on; a sweep none of whose trials completes is an error that sums up the
failures. Each trial writes its run to ``<output_dir>/<study_name>/trial_<n>/`` (TensorBoard,
config, checkpoints); the sweep ends with ``trials.md`` / ``trials.csv`` (sorted by the objective,
then the trials that did not count and why) and ``best.yaml``, the best trial's full config,
ready for ``python -m experiments fit --config``. ``optuna-dashboard <storage URL>`` shows the
study live.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import difflib
import functools
import importlib.util
import io
import itertools
import json
import math
import os
import random
import socket
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import optuna
import sqlalchemy.exc
import yaml
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from optuna.trial import FrozenTrial, TrialState

from experiments.sweep_views import best_tag, write_hparams_experiment, write_hparams_session, write_plots
from peftcore.files import write_atomically

PRIMITIVES = (type(None), bool, int, float, str)
PEFT_PREFIX = "model.peft.init_args."
HOST = socket.gethostname()
POLL_SECONDS = 2.0  # how often a worker with nothing to start looks at the others' trials again
# What a trial's record says happened to it (see _outcome). The first three count towards n_trials;
# the next three did not finish (their point runs again on a grid); a skipped trial never trained.
COUNTED = ("complete", "pruned", "failed")
LOST = ("interrupted", "worker died", "stale")


class SweepFailed(RuntimeError):
    """No trial of the sweep completed."""


class TrialSkipped(Exception):
    """A trial that must not train (its place is taken); recorded as skipped, never counted."""


@dataclass(frozen=True)
class Param:
    """One dimension of the space: ``choices``, or a range ``low``..``high`` (``log`` for
    log-uniform, ``int`` for integers, ``step`` for a grid of values in it)."""

    key: str
    choices: list | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    int: bool = False
    step: float | None = None

    @classmethod
    def parse(cls, key: str, spec: object) -> Param:
        if not isinstance(spec, dict):
            raise ValueError(
                f"space[{key!r}] must be {{choices: [...]}} or {{low: ..., high: ...}}, got {spec!r}"
            )
        unknown = set(spec) - {"choices", "low", "high", "log", "int", "step"}
        if unknown:
            raise ValueError(
                f"space[{key!r}] has {sorted(unknown)}; a dimension takes choices, or low, high, log, int, step"
            )
        param = cls(key, **spec)
        if param.choices is not None:
            if not isinstance(param.choices, list) or not param.choices:
                raise ValueError(f"space[{key!r}].choices must be a non-empty list, got {param.choices!r}")
            if param.low is not None or param.high is not None:
                raise ValueError(f"space[{key!r}] gives both choices and a range; give one")
        elif param.low is None or param.high is None or not param.low < param.high:
            raise ValueError(
                f"space[{key!r}] needs choices, or low < high (got low={param.low}, high={param.high})"
            )
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
            return trial.suggest_int(
                self.key, int(self.low), int(self.high), step=int(self.step or 1), log=self.log
            )
        return trial.suggest_float(self.key, self.low, self.high, step=self.step, log=self.log)


class TrialReporter(Callback):
    """Reports the objective to Optuna after each validation, prunes when the pruner says so, and
    stops a trial whose training loss is not finite. The trial's HParams session (its swept
    values, not the module's every setting) is written when it ends (experiments.sweep_views)."""

    logs_hyperparameters = True  # the module leaves TensorBoard's HParams to the sweep

    def __init__(self, trial: optuna.Trial, objective: str, maximize: bool) -> None:
        self.trial, self.objective, self.maximize = trial, objective, maximize
        self.best: float | None = None

    def on_fit_start(self, trainer, module) -> None:
        """Loggers other than TensorBoard (W&B) get the trial's swept values as its settings."""
        for logger in trainer.loggers:
            if not isinstance(logger, TensorBoardLogger):
                logger.log_hyperparams(self.trial.user_attrs.get("values", {}))

    def on_fit_end(self, trainer, module) -> None:
        if self.best is not None:
            for logger in trainer.loggers:
                if not isinstance(logger, TensorBoardLogger):
                    logger.log_metrics({best_tag(self.objective): self.best}, step=trainer.global_step)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        loss = float(outputs["loss"])
        if not math.isfinite(loss):
            raise FloatingPointError(f"the training loss is {loss} at step {trainer.global_step}")

    def on_validation_end(self, trainer, module) -> None:
        if trainer.sanity_checking:
            return
        if self.objective not in trainer.callback_metrics:
            raise ValueError(
                f"objective {self.objective!r} was not logged; the metrics are {sorted(trainer.callback_metrics)}"
            )
        value = float(trainer.callback_metrics[self.objective])
        if not math.isfinite(value):
            raise FloatingPointError(f"{self.objective} is {value} at epoch {trainer.current_epoch}")
        if self.best is None or (value > self.best if self.maximize else value < self.best):
            self.best = value
            self.trial.set_user_attr("best_value", value)
        self.trial.report(value, step=trainer.current_epoch)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned at epoch {trainer.current_epoch}: {self.objective}={value:.4f}")


@dataclass(frozen=True)
class _Trials:
    """What every trial of one sweep needs to know."""

    base_config: str
    fixed: list[str]
    params: list[Param]
    study_name: str
    root: Path
    objective: str
    direction: str
    n_trials: int
    grid: list[dict]  # a grid sampler's points in the seeded order; [] for the other samplers


def sweep(
    base_config: str | None = None,
    space: dict[str, dict] | None = None,
    study_name: str = "sweep",
    n_trials: int = 11,
    sampler: Literal["random", "grid", "tpe"] = "random",
    seed: int = 0,
    pruner: Literal["none", "median", "hyperband"] = "none",
    objective: str = "val/rougeL",
    direction: Literal["maximize", "minimize"] = "maximize",
    storage: str | None = None,
    output_dir: str = "runs/sweeps",
    overrides: list[str] | None = None,
) -> dict:
    """Run (or resume) a search over ``space`` until ``n_trials`` trials have finished.

    Args:
        base_config: the ``fit`` config every trial starts from.
        space: ``{dotted fit option: {choices: [...]} | {low, high, log, int, step}}``.
        study_name: the study's name in the storage, and its directory under output_dir.
        n_trials: trials to finish (completed, pruned or failed with an error), all workers
            together; with the grid sampler at most the number of points (each runs once).
        sampler: ``random`` (the study's), ``grid`` (every combination of choices) or ``tpe``.
        seed: the grid's order; for random and TPE, each trial's sampler is seeded with seed + the
            number of trials before it, so a resumed search draws new points.
        pruner: ``none``, ``median`` or ``hyperband``, on the per-epoch objective.
        objective: the validation metric each trial is scored by (its best epoch counts):
            ``val/loss``, or ``val/rouge1``, ``val/rouge2``, ``val/rougeL``, ``val/rougeLsum``
            (these need ``model.generate_in_validation: true``, the default).
        direction: ``maximize`` (ROUGE) or ``minimize`` (the loss) the objective.
        storage: an Optuna database URL; default ``sqlite:///<output_dir>/<study_name>.db``.
        output_dir: where the storage, the trials' runs and the results go.
        overrides: fixed ``fit`` options for every trial, e.g. ``["--trainer.max_epochs=2"]``.

    Raises:
        ValueError: a bad sweep file, objective or space, before any trial.
        SweepFailed: no trial completed (the table of their errors is written first).
    """
    if not base_config or not space:
        raise ValueError("a sweep needs base_config (a fit config) and a space (at least one dotted option)")
    if n_trials < 1:
        raise ValueError(f"n_trials must be a positive integer, got {n_trials}")
    params = [Param.parse(key, spec) for key, spec in space.items()]
    fixed = list(overrides or [])
    base = check_space(base_config, fixed, params)
    check_objective(objective, direction, base, params)
    grid = _grid_points(params, seed) if sampler == "grid" else []
    if grid:
        n_trials = min(n_trials, len(grid))

    root = Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    rdb = _storage(storage or f"sqlite:///{(root / f'{study_name}.db').resolve()}")
    study = optuna.create_study(
        storage=rdb,
        study_name=study_name,
        direction=direction,
        load_if_exists=True,
        pruner=_pruner(pruner, base),
    )
    study.sampler = _sampler(sampler, params, seed)
    setup = _Trials(base_config, fixed, params, study_name, root, objective, direction, n_trials, grid)
    write_hparams_experiment(root / study_name, params, objective)
    _run_until_finished(study, rdb, setup, sampler, seed)
    result = write_results(study, params, base_config, fixed, root / study_name, objective)
    print(
        f"views: the plots in {root / study_name / 'plots'}; tensorboard --logdir {root / study_name} (HParams tab); "
        f"optuna-dashboard {_shown_url(storage) if storage else 'sqlite:///' + str((root / f'{study_name}.db').resolve())}"
        + ("" if _dashboard_installed() else " (pip install 'peftcore[dashboard]')")
    )
    return result


def _shown_url(url: str) -> str:
    """A storage URL as printed: its password hidden."""
    return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)


def _dashboard_installed() -> bool:
    return importlib.util.find_spec("optuna_dashboard") is not None


def _run_until_finished(
    study: optuna.Study, rdb: optuna.storages.BaseStorage, setup: _Trials, sampler: str, seed: int
) -> None:
    """Start trials one at a time while the finished and running ones (all workers') fall short
    of n_trials; wait while others' trials in flight may finish the sweep."""
    waiting_said = False
    while True:
        _recover(study, rdb)
        trials = study.get_trials(deepcopy=False)
        finished = [t for t in trials if _outcome(t) in COUNTED]
        if len(finished) >= setup.n_trials:
            return
        running = [t for t in trials if t.state == TrialState.RUNNING]
        if len(finished) + len(running) >= setup.n_trials:
            if not waiting_said:
                print(
                    f"sweep {setup.study_name}: {len(finished)} trials finished and {len(running)} running "
                    f"on other workers make the {setup.n_trials}; waiting for them"
                )
                waiting_said = True
            time.sleep(POLL_SECONDS)  # they may finish the sweep, or fail and leave a trial to run
            continue
        if setup.grid:
            _queue_next_point(study, setup.grid)
        else:  # a resumed search (or another worker) draws new points
            study.sampler = _sampler(sampler, setup.params, seed + len(trials))
        study.optimize(lambda trial: _run_trial(trial, setup), n_trials=1, catch=(Exception,))


# --- what happened to a trial -------------------------------------------------------------------


def _outcome(trial: FrozenTrial) -> str:
    """``complete``, ``pruned``, ``failed`` (an error: it counts), ``interrupted`` (Ctrl-C),
    ``worker died`` (its process was gone), ``stale`` (no heartbeat for the grace period),
    ``skipped`` (it never trained: its place was taken), ``running`` or ``waiting``."""
    if trial.state == TrialState.COMPLETE:
        return "complete"
    if trial.state == TrialState.PRUNED:
        return "pruned"
    if trial.state != TrialState.FAIL:
        return trial.state.name.lower()
    attrs = trial.user_attrs
    for key, outcome in (
        ("error", "failed"),
        ("skipped", "skipped"),
        ("interrupted", "interrupted"),
        ("worker_died", "worker died"),
    ):
        if key in attrs:
            return outcome
    return "stale"  # failed by optuna.storages.fail_stale_trials, which records nothing else


def _point(trial: FrozenTrial) -> str:
    """The trial's point of the space as comparable text ({} while it has not drawn one)."""
    return json.dumps(trial.params or trial.user_attrs.get("point") or {}, sort_keys=True)


# --- workers that are gone ----------------------------------------------------------------------


def _recover(study: optuna.Study, rdb: optuna.storages.BaseStorage) -> None:
    """Fail the running trials whose worker is gone, so that they stop holding places (and, on a
    grid, their points)."""
    _fail_dead_workers(study, rdb)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # workers on other machines: after the grace period


def _fail_dead_workers(study: optuna.Study, rdb: optuna.storages.BaseStorage) -> None:
    """A running trial whose worker ran on this machine and whose process is gone is failed now
    (the heartbeat would take its grace period to say so)."""
    study_id = rdb.get_study_id_from_name(study.study_name)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        host, _, pid = str(trial.user_attrs.get("worker", "")).rpartition(":")
        if host != HOST or not pid.isdigit() or _alive(int(pid)):
            continue
        try:
            trial_id = rdb.get_trial_id_from_study_id_trial_number(study_id, trial.number)
            rdb.set_trial_user_attr(trial_id, "worker_died", f"its worker, process {pid} on {host}, was gone")
            study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # another worker failed it first


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process runs one trial at a time, and none is running between trials
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # a process of another user holds the number
    try:  # a zombie has exited; its parent has not collected it yet
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return True


def _grid_points(params: list[Param], seed: int) -> list[dict]:
    """Every combination of the choices (as Optuna stores them), in an order shuffled by ``seed``."""
    if any(p.choices is None for p in params):
        raise ValueError(
            "the grid sampler needs choices for every key; "
            + ", ".join(p.key for p in params if p.choices is None)
            + " is a range"
        )
    points = [
        dict(zip([p.key for p in params], values))
        for values in itertools.product(*(p.encoded() for p in params))
    ]
    random.Random(seed).shuffle(points)
    return points


def _queue_next_point(study: optuna.Study, grid: list[dict]) -> None:
    """Queue the first point of the grid that no finished, running or queued trial holds.

    The sweep walks the grid itself rather than leave it to Optuna's grid sampler, which counts a
    failed trial's point as visited (an interrupted trial's point would never run) and numbers
    its points in an order that depends on the seed of each process."""
    trials = study.get_trials(deepcopy=False)
    if any(t.state == TrialState.WAITING for t in trials):
        return  # the queue has one already
    held = {_point(t) for t in trials if _outcome(t) in (*COUNTED, "running")}
    for point in grid:
        if json.dumps(point, sort_keys=True) not in held:
            study.enqueue_trial(point, user_attrs={"point": point})
            return


# --- one trial ----------------------------------------------------------------------------------


def _run_trial(trial: optuna.Trial, setup: _Trials) -> float:

    trial.set_user_attr("worker", f"{HOST}:{os.getpid()}")
    try:
        values = {p.key: p.suggest(trial) for p in setup.params}
    except Exception as err:
        trial.set_user_attr("error", f"{type(err).__name__}: {err}"[:2000])
        raise
    trial.set_user_attr("values", values)
    reason = _taken(trial, setup)
    if reason:
        trial.set_user_attr("skipped", reason)
        raise TrialSkipped(reason)
    root, name = setup.root, setup.study_name
    state = "failed"
    try:
        best = _fit_trial(trial, setup, values)
        state = "complete"
        return best
    except optuna.TrialPruned:
        state = "pruned"
        raise
    except (KeyboardInterrupt, SystemExit):
        state = "interrupted"  # not finished, not counted: no HParams session
        raise
    finally:
        if state != "interrupted":  # TensorBoard's HParams view: the trial's values, state and best
            best_so_far = trial.user_attrs.get("best_value")
            started = trial.datetime_start.timestamp()
            write_hparams_session(
                root / name / f"trial_{trial.number}", values, state, best_so_far, setup.objective, started
            )


def _fit_trial(trial: optuna.Trial, setup: _Trials, values: dict) -> float:
    """Train one trial's point; returns its best objective."""
    from experiments.cli import RunPlace, finish_external_runs, lightning_cli

    root, name = setup.root, setup.study_name
    args = [
        "--config",
        setup.base_config,
        *setup.fixed,
        *(f"--{k}={json.dumps(v)}" for k, v in values.items()),
    ]
    place = RunPlace(str(root), name, f"trial_{trial.number}", group=name)
    trial.set_user_attr("run_dir", str(root / name / f"trial_{trial.number}"))
    try:
        cli = lightning_cli(args, run=False, exit_on_error=False, place=place)
        reporter = TrialReporter(trial, setup.objective, setup.direction == "maximize")
        cli.trainer.callbacks.append(reporter)
        try:
            cli.trainer.fit(cli.model, cli.datamodule)
        finally:
            finish_external_runs(cli.trainer)
    except optuna.TrialPruned:
        raise
    except (KeyboardInterrupt, SystemExit):
        # Not finished: mark it failed now (Optuna leaves it running); a resumed sweep runs its
        # place again (on a grid, its point).
        trial.set_user_attr("interrupted", True)
        trial.study.tell(trial, state=TrialState.FAIL)
        raise
    except Exception as err:
        trial.set_user_attr("error", f"{type(err).__name__}: {err}"[:2000])
        raise
    if reporter.best is None:
        trial.set_user_attr("error", f"no validation ran, so {setup.objective!r} was never measured")
        raise RuntimeError(trial.user_attrs["error"])
    return reporter.best


def _taken(trial: optuna.Trial, setup: _Trials) -> str | None:
    """Why this trial, already started, must not train, or None. Workers decide to start a trial
    before they create it, so two may both take the last place; of the trials running, the one
    started first keeps it. On a grid, a point is run once: a finished trial or one started
    earlier that holds this trial's point takes it."""
    trials = trial.study.get_trials(deepcopy=False)
    me = next(t for t in trials if t.number == trial.number)
    ahead = [
        t
        for t in trials
        if t.state == TrialState.RUNNING
        and t.number != me.number
        and (t.datetime_start, t.number) < (me.datetime_start, me.number)
    ]
    finished = [t for t in trials if _outcome(t) in COUNTED]
    if setup.grid:
        point = json.dumps(trial.params, sort_keys=True)
        holder = next((t for t in [*finished, *ahead] if _point(t) == point), None)
        if holder is not None:
            return f"trial {holder.number} holds its point"
    if len(finished) + len(ahead) >= setup.n_trials:
        return f"{len(finished)} trials finished and {len(ahead)} started earlier make the {setup.n_trials}"
    return None


# --- checks before any trial --------------------------------------------------------------------


def validation_metrics(generate: bool) -> list[str]:
    """What Seq2SeqFineTuner logs in validation: ``val/loss`` at every step and, when it generates
    (``generate_in_validation``), ``val/<ROUGE key>`` at each epoch's end."""
    from experiments.metrics import ROUGE_KEYS

    return ["val/loss", *(f"val/{key}" for key in ROUGE_KEYS if generate)]


def check_objective(objective: str, direction: str, base: dict, params: list[Param]) -> None:
    """Refuse an objective no trial would log, or one that the direction would score backwards."""
    every = validation_metrics(True)
    if objective not in every:
        close = difflib.get_close_matches(objective, every, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"objective {objective!r} is not a metric the model logs in validation; "
            f"it logs {', '.join(every)}{hint}"
        )
    generates = [(base.get("model") or {}).get("generate_in_validation", True)]
    generates += next((p.candidates() for p in params if p.key == "model.generate_in_validation"), [])
    if objective not in validation_metrics(all(generates)):
        raise ValueError(
            f"objective {objective!r} is measured on generated summaries, but model.generate_in_validation "
            f"is false in the base config or the space ({generates}); set it true, or use val/loss"
        )
    lower_is_better = objective == "val/loss"
    if lower_is_better != (direction == "minimize"):
        better = "minimize" if lower_is_better else "maximize"
        raise ValueError(
            f"direction {direction!r} would pick the worst trial by {objective}; give direction: {better}"
        )


def check_space(base_config: str, fixed: list[str], params: list[Param]) -> dict:
    """Refuse a space that cannot run before any trial starts: every key must be a fit option,
    and every candidate value one that option, the method's config, the data module and the
    model accept. Returns the base config as the CLI parses it."""
    base = _parsed([*_config_args(base_config), *fixed], "the base config with overrides")
    _check_constructors(base, "the base config with overrides")
    first = [f"--{p.key}={json.dumps(p.candidates()[0])}" for p in params]
    _parsed([*_config_args(base_config), *fixed, *first], "the space")  # unknown keys, types
    peft = base.get("model", {}).get("peft") or {}
    cls = config_class(peft["class_path"]) if peft.get("class_path") else None
    for p in params:
        for value in p.candidates():
            what = f"space[{p.key!r}] value {value!r}"
            if p.key.startswith(PEFT_PREFIX) and cls is not None:
                try:
                    cls(**{**(peft.get("init_args") or {}), p.key.removeprefix(PEFT_PREFIX): value})
                except (TypeError, ValueError) as err:
                    raise ValueError(f"{what} is refused: {err}") from None
            else:
                config = _parsed([*_config_args(base_config), *fixed, f"--{p.key}={json.dumps(value)}"], what)
                _check_constructors(config, what)
    return base


def _check_constructors(config: dict, what: str) -> None:
    """Construct the data module from ``config``'s data section (cheap: nothing is loaded) and
    run the model's own checks on its model section (Seq2SeqFineTuner.check_settings: nothing
    is built), so that their ValueErrors come now."""
    from experiments.cli import Seq2SeqFineTuner

    try:
        _section("data", config.get("data") or {})
        Seq2SeqFineTuner.check_settings(**vars(_section("model", config.get("model") or {})))
    except (TypeError, ValueError) as err:
        raise ValueError(f"{what} is refused: {err}") from None


@functools.cache
def _section_parser(section: str):
    """A parser of one section of the fit config: the data module built, the model's arguments
    with their own classes (the method's config...) built but not the model."""
    from jsonargparse import ArgumentParser

    from experiments.cli import (  # the CLI's classes, its parse settings
        DialogSummaryDataModule,
        Seq2SeqFineTuner,
    )

    parser = ArgumentParser(exit_on_error=False)
    cls = {"model": Seq2SeqFineTuner, "data": DialogSummaryDataModule}[section]
    parser.add_class_arguments(cls, section, instantiate=section == "data")
    return parser


def _section(section: str, init_args: dict) -> Any:
    parser = _section_parser(section)
    return parser.instantiate(parser.parse_object({section: init_args}))[section]


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


def _storage(url: str) -> optuna.storages.RDBStorage:
    """An RDB storage with heartbeats, so a worker that dies leaves a trial others can tell is stale.

    Workers started together on a new database race to create its schema: the losers' CREATE
    TABLE or schema-version insert fails, and a second look finds the schema the winner made.
    """
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
    for attempt in range(5):
        try:
            return optuna.storages.RDBStorage(
                url, engine_kwargs=engine, heartbeat_interval=30, grace_period=90
            )
        except sqlalchemy.exc.DBAPIError as err:
            lost_the_race = isinstance(err, sqlalchemy.exc.IntegrityError) or "already exists" in str(err)
            if not lost_the_race or attempt == 4:
                raise
            time.sleep(0.2 * (attempt + 1))


def _sampler(name: str, params: list[Param], seed: int) -> optuna.samplers.BaseSampler:
    if (
        name == "grid"
    ):  # it records the space; the sweep queues every trial's point itself (_queue_next_point)
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


# --- results ------------------------------------------------------------------------------------


def write_results(
    study: optuna.Study, params: list[Param], base_config: str, fixed: list[str], out: Path, objective: str
) -> dict:
    """trials.md / trials.csv: the finished trials sorted by the objective, then those that did not
    count (interrupted, dead worker, stale) and what took their place; best.yaml: the best trial's
    config. Raises SweepFailed, after writing the tables, when no trial completed."""
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    everything = study.get_trials(deepcopy=False)
    counted = sorted(
        (t for t in everything if _outcome(t) in COUNTED),
        key=lambda t: (t.value is None, -(t.value or 0) if maximize else (t.value or 0)),
    )
    lost = [t for t in everything if _outcome(t) in LOST]
    header = ["trial", "state", objective, *(p.key for p in params), "run or error"]
    rows = [
        [
            t.number,
            _outcome(t),
            "" if t.value is None else round(t.value, 4),
            *(json.dumps(t.user_attrs.get("values", {}).get(p.key)) for p in params),
            _note(t, everything),
        ]
        for t in [*counted, *lost]
    ]
    table = "| " + " | ".join(header) + " |\n|" + " --- |" * len(header) + "\n"
    table += "".join("| " + " | ".join(str(c).replace("|", "/") for c in row) + " |\n" for row in rows)
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows([header, *rows])
    try:
        plots = write_plots(study, params, out, objective, _outcome) if counted else {}
    except Exception as err:  # the tables and best.yaml matter more than the pictures
        warnings.warn(
            f"sweep {study.study_name}: the plots were not drawn: {type(err).__name__}: {err}", stacklevel=2
        )
        plots = {}
    for trial in counted:  # sessions a trial's end did not write (the trials of an older sweep)
        values, best = trial.user_attrs.get("values", {}), trial.user_attrs.get("best_value", trial.value)
        started = trial.datetime_start.timestamp() if trial.datetime_start else 0.0
        write_hparams_session(
            out / f"trial_{trial.number}", values, _outcome(trial), best, objective, started
        )
    links = " · ".join(f"[{name.replace('_', ' ')}](plots/{path.name})" for name, path in plots.items())
    write_atomically(
        out / "trials.md",
        f"# Sweep {study.study_name}: {objective}\n\n{table}" + (f"\nPlots: {links}\n" if links else ""),
    )
    write_atomically(out / "trials.csv", buffer.getvalue())
    print(table)
    completed = [t for t in counted if t.state == TrialState.COMPLETE]
    result = {
        "study": study.study_name,
        "trials": len(counted),
        "table": str(out / "trials.md"),
        "plots": {name: str(path) for name, path in plots.items()},
    }
    if completed:
        best = completed[0]
        values = best.user_attrs["values"]
        config = _parsed(
            [*_config_args(base_config), *fixed, *(f"--{k}={json.dumps(v)}" for k, v in values.items())],
            "the best trial's config",
        )
        header_line = f"# The best trial of sweep {study.study_name!r}: trial {best.number}, {objective} = {best.value:.4f}\n"
        write_atomically(out / "best.yaml", header_line + yaml.safe_dump(config, sort_keys=False))
        result.update(
            best_trial=best.number,
            best_value=best.value,
            best_values=values,
            best_run=best.user_attrs["run_dir"],
            best_config=str(out / "best.yaml"),
        )
        print(f"best: trial {best.number}, {objective} = {best.value:.4f}; config: {out / 'best.yaml'}")
    write_atomically(out / "result.json", json.dumps(result, indent=2) + "\n")
    if not completed:
        raise SweepFailed(_failure_summary(study.study_name, counted, out / "trials.md"))
    return result


def _note(trial: FrozenTrial, everything: list[FrozenTrial]) -> str:
    """The run directory or error of a finished trial; why a lost one does not count."""
    outcome = _outcome(trial)
    if outcome in COUNTED:
        return trial.user_attrs.get("error") or trial.user_attrs.get("run_dir", "")
    why = {
        "interrupted": "interrupted (Ctrl-C)",
        "stale": "no heartbeat for the grace period (its worker died)",
        "worker died": trial.user_attrs.get("worker_died", "its worker died"),
    }[outcome]
    again = next(
        (
            t.number
            for t in everything
            if t.number > trial.number
            and _outcome(t) in COUNTED
            and trial.params
            and _point(t) == _point(trial)
        ),
        None,
    )
    return f"not counted: {why}" + (f"; its point ran again as trial {again}" if again is not None else "")


def _failure_summary(name: str, finished: list[FrozenTrial], table: Path) -> str:
    """Every distinct error with the trials that hit it."""
    if not finished:
        return f"sweep {name!r} finished no trial; see {table}"
    errors: dict[str, list[int]] = {}
    for trial in sorted(finished, key=lambda t: t.number):
        errors.setdefault(trial.user_attrs.get("error") or _outcome(trial), []).append(trial.number)
    lines = [f"  trial{'s' * (len(n) > 1)} {', '.join(map(str, n))}: {error}" for error, n in errors.items()]
    return f"no trial of sweep {name!r} completed ({len(finished)} finished); see {table}\n" + "\n".join(
        lines
    )

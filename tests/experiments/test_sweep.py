"""Sweeps: a random search that writes its table and a ready-to-run best config, resuming without
repeating finished trials, a grid run point by point across a Ctrl-C and a kill -9, two workers on
one storage finishing exactly n_trials, bad objectives and spaces refused before any trial, a
failing trial recorded while the sweep goes on, and a sweep with no completed trial an error."""

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback

from experiments.__main__ import main
from experiments.cli import lightning_cli
from experiments.sweep import TrialReporter, sweep

pytestmark = pytest.mark.e2e  # whole commands: `pytest -m "not e2e"` skips them

ROOT = Path(__file__).resolve().parents[2]
DEMO = str(ROOT / "experiments/configs/demo.yaml")
TINY = [
    "--data.limit_train=4",
    "--data.limit_val=2",
    "--data.batch_size=4",
    "--data.max_source_length=48",
    "--model.generation.max_new_tokens=4",
    "--trainer.max_epochs=1",
    "--trainer.limit_val_batches=1",
    "--trainer.enable_model_summary=false",
    "--trainer.enable_progress_bar=true",
]
SPACE = {
    "model.optimizer.lr": {"choices": [0.003, 0.001]},
    "model.peft.init_args.r": {"choices": [4, 8]},
    "model.optimizer.weight_decay": {"low": 0.0, "high": 0.1},
}


def run(tmp_path, **kwargs):
    options = dict(
        base_config=DEMO,
        space=SPACE,
        study_name="s",
        n_trials=3,
        seed=1,
        output_dir=str(tmp_path / "sweeps"),
        overrides=TINY,
    )
    return sweep(**{**options, **kwargs})


def trials(tmp_path, name="s"):
    return optuna.load_study(
        study_name=name, storage=f"sqlite:///{tmp_path / 'sweeps' / (name + '.db')}"
    ).trials


def test_a_random_sweep_writes_the_table_and_a_best_config_that_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run(tmp_path)
    out = tmp_path / "sweeps/s"
    assert result["trials"] == 3 and (out / "trials.md").exists() and (out / "trials.csv").exists()
    table = (out / "trials.md").read_text()
    assert table.count("| complete |") == 3 and "model.peft.init_args.r" in table
    assert {t.user_attrs["values"]["model.optimizer.lr"] for t in trials(tmp_path)} <= {0.003, 0.001}
    for n in range(3):  # each trial is an ordinary run with its own directory
        assert (out / f"trial_{n}/checkpoints/best.ckpt").exists() and (
            out / f"trial_{n}/config.yaml"
        ).exists()
    best = yaml.safe_load((out / "best.yaml").read_text())
    assert best["model"]["peft"]["init_args"]["r"] == result["best_values"]["model.peft.init_args.r"]
    cli = lightning_cli(["fit", "--config", str(out / "best.yaml"), "--trainer.fast_dev_run=true"])
    assert cli.model.model.peftcore_config.r == result["best_values"]["model.peft.init_args.r"]


class InterruptTrial(Callback):
    """A Ctrl-C in the middle of the trial whose run is ``version`` (Lightning stops, exit 1)."""

    def __init__(self, version: str) -> None:
        self.version = version

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.logger.version == self.version:
            raise KeyboardInterrupt


def test_an_interrupted_sweep_resumes_without_repeating_finished_trials(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    interrupt = "--trainer.callbacks+=" + json.dumps(
        {"class_path": "test_sweep.InterruptTrial", "init_args": {"version": "trial_1"}}
    )
    with pytest.raises(SystemExit):
        run(tmp_path, overrides=[*TINY, interrupt])
    first = tmp_path / "sweeps/s/trial_0/checkpoints/best.ckpt"
    stamp = first.stat().st_mtime_ns
    assert [t.state.name for t in trials(tmp_path)] == ["COMPLETE", "FAIL"]
    run(tmp_path)
    states = [t.state.name for t in trials(tmp_path)]
    assert states == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]  # 3 finished; trial 0 was not run again
    assert first.stat().st_mtime_ns == stamp and trials(tmp_path)[1].user_attrs.get("interrupted")


GRID = {"model.optimizer.lr": {"choices": [0.003, 0.002, 0.001]}}


def points(tmp_path, state="COMPLETE") -> list[float]:
    return [t.user_attrs["values"]["model.optimizer.lr"] for t in trials(tmp_path) if t.state.name == state]


def test_an_interrupted_grid_sweep_runs_every_point_exactly_once(tmp_path, monkeypatch):
    # Optuna's grid sampler counts a failed trial's point as visited and numbers its points after
    # shuffling them with its seed: reseeded on resume, it ran one point twice and skipped one.
    monkeypatch.chdir(tmp_path)
    interrupt = "--trainer.callbacks+=" + json.dumps(
        {"class_path": "test_sweep.InterruptTrial", "init_args": {"version": "trial_1"}}
    )
    with pytest.raises(SystemExit):
        run(tmp_path, space=GRID, sampler="grid", overrides=[*TINY, interrupt])
    [interrupted] = points(tmp_path, "FAIL")
    run(tmp_path, space=GRID, sampler="grid")
    assert sorted(points(tmp_path)) == [0.001, 0.002, 0.003]  # each point once, the interrupted one too
    assert [t.state.name for t in trials(tmp_path)] == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    table = (tmp_path / "sweeps/s/trials.md").read_text()
    assert table.count("| complete |") == 3 and "| interrupted |" in table
    rerun = next(
        t for t in trials(tmp_path)[2:] if t.user_attrs["values"]["model.optimizer.lr"] == interrupted
    )
    assert f"not counted: interrupted (Ctrl-C); its point ran again as trial {rerun.number}" in table


class KillWorker(Callback):
    """kill -9 of the worker process in the middle of the trial whose run is ``version``."""

    def __init__(self, version: str) -> None:
        self.version = version

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.logger.version == self.version:
            os.kill(os.getpid(), signal.SIGKILL)


def worker_command(tmp_path, name: str, **options) -> tuple[list[str], dict]:
    config = tmp_path / f"{name}.yaml"
    options = {
        **dict(
            base_config=DEMO,
            space=SPACE,
            study_name=name,
            seed=1,
            output_dir=str(tmp_path / "sweeps"),
            overrides=TINY,
        ),
        **options,
    }
    config.write_text(yaml.safe_dump(options))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests/experiments")])}
    return [sys.executable, "-m", "experiments", "sweep", "--config", str(config)], env


def test_a_trial_whose_worker_was_killed_is_failed_at_once_and_its_point_runs_again(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    grid = {"model.optimizer.lr": {"choices": [0.003, 0.001]}}
    kill = "--trainer.callbacks+=" + json.dumps(
        {"class_path": "test_sweep.KillWorker", "init_args": {"version": "trial_0"}}
    )
    command, env = worker_command(
        tmp_path, "s", space=grid, sampler="grid", n_trials=2, overrides=[*TINY, kill]
    )
    worker = subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    _, err = worker.communicate(timeout=600)
    assert worker.returncode == -signal.SIGKILL, err[-2000:]
    assert [t.state.name for t in trials(tmp_path)] == ["RUNNING"]  # what kill -9 leaves
    started = time.monotonic()
    run(tmp_path, space=grid, sampler="grid")
    assert time.monotonic() - started < 60  # not after the heartbeat's 90 s grace: the process is known dead
    killed = trials(tmp_path)[0]
    assert killed.state.name == "FAIL" and f"process {worker.pid} on" in killed.user_attrs["worker_died"]
    assert [t.state.name for t in trials(tmp_path)] == ["FAIL", "COMPLETE", "COMPLETE"]
    assert sorted(points(tmp_path)) == [0.001, 0.003]  # the killed trial's point ran again
    assert "| 0 | worker died |" in (tmp_path / "sweeps/s/trials.md").read_text()


def test_two_workers_on_one_study_finish_exactly_n_trials(tmp_path):
    command, env = worker_command(tmp_path, "shared", n_trials=3)
    workers = [
        subprocess.Popen(
            command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    for worker in workers:
        _, err = worker.communicate(timeout=600)
        assert worker.returncode == 0, err[-2000:]
    states = [t.state.name for t in trials(tmp_path, "shared")]
    assert states.count("COMPLETE") == 3  # not one more per worker
    skipped = [t for t in trials(tmp_path, "shared") if t.state.name == "FAIL"]
    assert all("skipped" in t.user_attrs for t in skipped)  # a trial that lost the last place never trained


def _open_storage(url: str) -> None:
    from experiments.sweep import _storage

    optuna.create_study(storage=_storage(url), study_name="s", load_if_exists=True)


def test_workers_racing_to_create_a_new_database_all_get_it(tmp_path):
    # Unguarded, about one process in eight loses the race for the schema (CREATE TABLE or the
    # schema-version insert fails); every one of these must open the study.
    context = multiprocessing.get_context("fork")  # the children reuse the loaded modules
    for attempt in range(6):
        url = f"sqlite:///{tmp_path / f'race{attempt}.db'}"
        workers = [context.Process(target=_open_storage, args=(url,)) for _ in range(3)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(timeout=120)
        assert [worker.exitcode for worker in workers] == [0, 0, 0]


@pytest.mark.parametrize(
    "space, message",
    [
        ({"model.lrr": {"choices": [0.1]}}, r"does not parse.*model\.lrr"),
        (
            {"model.optimizer.lr": {"choices": []}},
            r"space\['model\.optimizer\.lr'\]\.choices must be a non-empty list",
        ),
        (
            {"model.peft.init_args.r": {"choices": [8, 0]}},
            r"value 0 is refused: LoRAConfig\.r must be a positive integer",
        ),
        ({"model.optimizer.lr": {"low": 0.0, "high": 1.0, "log": True}}, r"log-uniform, so low must be > 0"),
        ({"model.optimizer.lr": {"between": [1, 2]}}, r"has \['between'\]"),
        (
            {"data.batch_size": {"choices": [4, 0]}},
            r"'data\.batch_size'\] value 0 is refused: batch_size must be a positive",
        ),
        (
            {"model.optimizer.warmup_ratio": {"choices": [0.1, 1.5]}},
            r"value 1\.5 is refused: model\.optimizer\.warmup_ratio must be in \[0, 1\)",
        ),
        (
            {"model.optimizer.lr": {"low": 0.0, "high": 0.01}},
            r"'model\.optimizer\.lr'\] value 0\.0 is refused: model\.optimizer\.lr must be a positive number",
        ),
    ],
)
def test_an_invalid_space_is_refused_before_any_trial(tmp_path, space, message):
    with pytest.raises(ValueError, match=message):
        run(tmp_path, space=space)
    assert not (tmp_path / "sweeps/s.db").exists()


@pytest.mark.parametrize(
    "options, message",
    [
        (
            dict(objective="val/rouge_l"),
            r"'val/rouge_l' is not a metric the model logs in validation; it logs val/loss, "
            r"val/rouge1, val/rouge2, val/rougeL, val/rougeLsum; did you mean 'val/rougeL'",
        ),
        (
            dict(objective="val/loss"),
            r"direction 'maximize' would pick the worst trial by val/loss; give direction: minimize",
        ),
        (
            dict(overrides=[*TINY, "--model.generate_in_validation=false"]),
            r"needs model.generate_in_validation|generated summaries",
        ),
    ],
)
def test_an_objective_no_trial_would_score_is_refused_before_any_trial(tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        run(tmp_path, **options)
    assert not (tmp_path / "sweeps/s.db").exists()


def test_a_sweep_whose_trials_all_fail_exits_non_zero_with_the_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "sweep.yaml"
    space = {"model.peft.init_args.target_modules": {"choices": [["nope"], ["nada"]]}}
    config.write_text(
        yaml.safe_dump(
            dict(
                base_config=DEMO,
                space=space,
                sampler="grid",
                study_name="s",
                output_dir=str(tmp_path / "sweeps"),
                overrides=TINY,
            )
        )
    )
    with pytest.raises(SystemExit) as exit:
        main(["sweep", "--config", str(config)])
    message = str(exit.value.code)
    assert message.startswith("error: no trial of sweep 's' completed (2 finished)")
    assert "trial 0: " in message and "trial 1: " in message and message.count("matches no module") == 2
    assert (tmp_path / "sweeps/s/trials.md").exists()  # the table is written first


def test_a_failing_trial_is_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    space = {"model.peft.init_args.target_modules": {"choices": [["q", "v"], ["nope"]]}}
    result = run(tmp_path, space=space, sampler="grid", n_trials=5)
    assert result["trials"] == 2  # the grid has two points
    states = {
        json.dumps(t.user_attrs["values"]["model.peft.init_args.target_modules"]): t for t in trials(tmp_path)
    }
    assert states['["q", "v"]'].state.name == "COMPLETE"
    assert (
        states['["nope"]'].state.name == "FAIL"
        and "matches no module" in states['["nope"]'].user_attrs["error"]
    )
    assert "matches no module" in (tmp_path / "sweeps/s/trials.md").read_text()


def test_the_reporter_prunes_when_the_pruner_says_so():
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.ThresholdPruner(lower=0.5))
    reporter = TrialReporter(study.ask(), "val/rougeL", maximize=True)

    class Trainer:
        sanity_checking, current_epoch = False, 0
        callback_metrics = {"val/rougeL": torch.tensor(0.1)}

    with pytest.raises(optuna.TrialPruned, match="pruned at epoch 0"):
        reporter.on_validation_end(Trainer(), None)
    assert reporter.best == pytest.approx(0.1)


def small_study(tmp_path) -> tuple[optuna.Study, optuna.storages.RDBStorage]:
    from experiments.sweep import _storage

    storage = _storage(f"sqlite:///{tmp_path / 'unit.db'}")
    return optuna.create_study(storage=storage, study_name="unit"), storage


def test_of_two_trials_started_for_the_last_place_the_first_keeps_it(tmp_path):
    from experiments.sweep import _taken, _Trials

    study, _ = small_study(tmp_path)
    for _ in range(2):
        study.tell(study.ask(), 1.0)
    first, second = study.ask(), study.ask()  # two workers both saw 2 of 3 finished
    setup = _Trials(DEMO, [], [], "unit", tmp_path, "val/rougeL", "maximize", n_trials=3, grid=[])
    assert _taken(first, setup) is None
    assert _taken(second, setup) == "2 trials finished and 1 started earlier make the 3"


def test_a_running_trial_is_failed_at_once_only_when_its_worker_is_known_dead(tmp_path):
    from experiments.sweep import HOST, _recover

    study, storage = small_study(tmp_path)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a process of this machine that has exited
    workers = [f"{HOST}:{gone.pid}", f"{HOST}:{os.getppid()}", f"elsewhere:{gone.pid}"]
    for worker in workers:
        study.ask().set_user_attr("worker", worker)
    _recover(study, storage)
    assert [t.state.name for t in study.trials] == [
        "FAIL",
        "RUNNING",
        "RUNNING",
    ]  # another machine: the heartbeat decides


@pytest.mark.parametrize("path", sorted((ROOT / "experiments/sweeps").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_sweep_file_passes_the_checks_made_before_a_trial(path, monkeypatch):
    """Each value of each shipped space parses and passes the method's and the model's checks."""
    from experiments.sweep import Param, check_objective, check_space

    monkeypatch.chdir(ROOT)  # the files name their base config relative to the repository
    spec = yaml.safe_load(path.read_text())
    params = [Param.parse(key, value) for key, value in spec["space"].items()]
    base = check_space(spec["base_config"], list(spec.get("overrides") or []), params)
    check_objective(spec["objective"], spec["direction"], base, params)

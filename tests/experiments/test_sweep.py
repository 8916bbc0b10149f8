"""Sweeps: a random search that writes its table and a ready-to-run best config, resuming without
repeating finished trials, two workers on one storage, bad spaces refused before any trial, and a
failing trial recorded while the sweep goes on."""

import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback

from experiments.cli import lightning_cli
from experiments.sweep import TrialReporter, sweep

ROOT = Path(__file__).resolve().parents[2]
DEMO = str(ROOT / "experiments/configs/demo.yaml")
TINY = ["--data.limit_train=4", "--data.limit_val=2", "--data.batch_size=4", "--data.max_source_length=48",
        "--model.max_new_tokens=4", "--trainer.max_epochs=1", "--trainer.limit_val_batches=1",
        "--trainer.enable_model_summary=false", "--trainer.enable_progress_bar=true"]
SPACE = {"model.lr": {"choices": [0.003, 0.001]}, "model.peft.init_args.r": {"choices": [4, 8]},
         "model.weight_decay": {"low": 0.0, "high": 0.1}}


def run(tmp_path, **kwargs):
    options = dict(base_config=DEMO, space=SPACE, study_name="s", n_trials=3, seed=1,
                   output_dir=str(tmp_path / "sweeps"), overrides=TINY)
    return sweep(**{**options, **kwargs})


def trials(tmp_path, name="s"):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / 'sweeps' / (name + '.db')}").trials


def test_a_random_sweep_writes_the_table_and_a_best_config_that_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run(tmp_path)
    out = tmp_path / "sweeps/s"
    assert result["trials"] == 3 and (out / "trials.md").exists() and (out / "trials.csv").exists()
    table = (out / "trials.md").read_text()
    assert table.count("| complete |") == 3 and "model.peft.init_args.r" in table
    assert {t.user_attrs["values"]["model.lr"] for t in trials(tmp_path)} <= {0.003, 0.001}
    for n in range(3):  # each trial is an ordinary run with its own directory
        assert (out / f"trial_{n}/checkpoints/best.ckpt").exists() and (out / f"trial_{n}/config.yaml").exists()
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
    interrupt = "--trainer.callbacks+=" + json.dumps({"class_path": "test_sweep.InterruptTrial",
                                                       "init_args": {"version": "trial_1"}})
    with pytest.raises(SystemExit):
        run(tmp_path, overrides=[*TINY, interrupt])
    first = tmp_path / "sweeps/s/trial_0/checkpoints/best.ckpt"
    stamp = first.stat().st_mtime_ns
    assert [t.state.name for t in trials(tmp_path)] == ["COMPLETE", "FAIL"]
    run(tmp_path)
    states = [t.state.name for t in trials(tmp_path)]
    assert states == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]  # 3 finished; trial 0 was not run again
    assert first.stat().st_mtime_ns == stamp and trials(tmp_path)[1].user_attrs.get("interrupted")


def test_two_workers_share_one_study(tmp_path):
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump(dict(base_config=DEMO, space=SPACE, study_name="shared", n_trials=4,
                                          output_dir=str(tmp_path / "sweeps"), overrides=TINY)))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    workers = [subprocess.Popen([sys.executable, "-m", "experiments", "sweep", "--config", str(config)], cwd=tmp_path,
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for worker in workers:
        _, err = worker.communicate(timeout=600)
        assert worker.returncode == 0, err[-2000:]
    done = [t for t in trials(tmp_path, "shared") if t.state.name == "COMPLETE"]
    assert 4 <= len(done) <= 5  # each worker stops once 4 are finished; one may be in flight then
    assert len({t.user_attrs["worker"] for t in done}) == 2 and len({t.number for t in done}) == len(done)


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
        ({"model.lr": {"choices": []}}, r"space\['model\.lr'\]\.choices must be a non-empty list"),
        ({"model.peft.init_args.r": {"choices": [8, 0]}}, r"value 0 is refused: LoRAConfig\.r must be a positive integer"),
        ({"model.lr": {"low": 0.0, "high": 1.0, "log": True}}, r"log-uniform, so low must be > 0"),
        ({"model.lr": {"between": [1, 2]}}, r"has \['between'\]"),
    ],
)
def test_an_invalid_space_is_refused_before_any_trial(tmp_path, space, message):
    with pytest.raises(ValueError, match=message):
        run(tmp_path, space=space)
    assert not (tmp_path / "sweeps/s.db").exists()


def test_a_failing_trial_is_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    space = {"model.peft.init_args.target_modules": {"choices": [["q", "v"], ["nope"]]}}
    result = run(tmp_path, space=space, sampler="grid", n_trials=5)
    assert result["trials"] == 2  # the grid has two points
    states = {json.dumps(t.user_attrs["values"]["model.peft.init_args.target_modules"]): t for t in trials(tmp_path)}
    assert states['["q", "v"]'].state.name == "COMPLETE"
    assert states['["nope"]'].state.name == "FAIL" and "matches no module" in states['["nope"]'].user_attrs["error"]
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

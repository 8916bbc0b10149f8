"""Weights & Biases from the configs, offline (WANDB_MODE=offline: no account, no network): a
fit logs its metrics and settings to W&B beside TensorBoard, a sweep logs each trial as a W&B run
in one group, and without the package nothing else changes."""

from __future__ import annotations

import functools
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import DEMO, TINY_FIT

from experiments.cli import lightning_cli
from experiments.sweep import sweep

wandb = pytest.importorskip("wandb")  # peftcore[wandb]; in the dev install
pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
WANDB = str(ROOT / "experiments/configs/wandb.yaml")
TINY = [*TINY_FIT, "--trainer.log_every_n_steps=1"]


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    yield
    wandb.finish()  # a fit leaves its run open for the process (as wandb does); the next test starts anew


def test_a_fit_logs_to_wandb_beside_tensorboard(tmp_path):
    cli = lightning_cli(["fit", "--config", DEMO, "--config", WANDB, *TINY])
    tensorboard, wandb_logger = cli.trainer.loggers
    assert type(wandb_logger).__name__ == "WandbLogger"
    run_dir = tmp_path / "runs/demo/version_0"  # the run's directory is TensorBoard's, as without W&B
    assert (run_dir / "checkpoints/best.ckpt").exists() and any(run_dir.glob("events.out.tfevents.*"))
    run = wandb_logger.experiment
    summary, config = dict(run.summary), dict(run.config)
    assert {"train/loss", "val/loss", "val/rougeL"} <= set(summary)
    assert config["pretrained"] == "bundled:t5-tiny-dialogue" and config["params/all_params"] > 0
    (offline_run,) = (tmp_path / "runs/wandb").glob("offline-run-*")
    assert any(offline_run.glob("*.wandb"))  # what `wandb sync` uploads later


def test_a_sweep_logs_each_trial_as_a_wandb_run_in_one_group(monkeypatch):
    started = []
    init = wandb.init

    @functools.wraps(init)  # its signature too: the CLI reads WandbLogger's options from wandb.init's
    def recording_init(*args, **kwargs):
        run = init(*args, **kwargs)
        started.append(run)
        return run

    summaries = {}
    finish = wandb.finish

    def recording_finish(*args, **kwargs):  # what the run holds as the sweep ends it
        if wandb.run is not None:
            summaries[wandb.run.name] = dict(wandb.run.summary)
        return finish(*args, **kwargs)

    monkeypatch.setattr(wandb, "init", recording_init)
    monkeypatch.setattr(wandb, "finish", recording_finish)
    space = {"model.optimizer.lr": {"choices": [0.003, 0.001]}}
    sweep(base_config=DEMO, space=space, study_name="s", n_trials=2, seed=0, output_dir="sweeps",
          overrides=["--config", WANDB, *TINY])  # fmt: skip
    assert sorted(run.name for run in started) == ["s/trial_0", "s/trial_1"]
    assert {run.group for run in started} == {"s"}
    for run in started:
        assert dict(run.config)["model.optimizer.lr"] in (0.003, 0.001)  # the trial's swept value
        assert "sweep/best_val_rougeL" in summaries[run.name] and "val/loss" in summaries[run.name]


def test_without_wandb_nothing_else_changes(tmp_path):
    """The package hidden: the CLI, sweeps and the study import and a fit runs with TensorBoard."""
    code = (
        "import sys; sys.modules['wandb'] = None\n"
        "import experiments.cli, experiments.sweep, experiments.study, experiments.evaluate\n"
        f"experiments.cli.lightning_cli(['fit', '--config', {DEMO!r}, *{TINY!r}])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "runs/demo/version_0/checkpoints/last.ckpt").exists()

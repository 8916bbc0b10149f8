"""The study pipeline on a minimal config: base, a fixed run and a sweep, each evaluated (with
evaluation-only overrides), then the report; a rerun skips every finished stage and completes an
evaluation record cut short."""

import json
from pathlib import Path

import optuna
import pytest

from experiments.study import study

pytestmark = pytest.mark.e2e  # whole commands: `pytest -m "not e2e"` skips them

ROOT = Path(__file__).resolve().parents[2]
DEMO = str(ROOT / "experiments/configs/demo.yaml")
TINY = [
    "--data.limit_train=4",
    "--data.limit_val=2",
    "--data.limit_test=2",
    "--data.batch_size=4",
    "--data.max_source_length=48",
    "--model.generation.max_new_tokens=4",
    "--trainer.max_epochs=1",
    "--trainer.limit_val_batches=1",
    "--trainer.enable_model_summary=false",
]


def run(tmp_path):
    return study(
        base_config=DEMO,
        output_dir=str(tmp_path / "study"),
        overrides=TINY,
        evaluate={
            "bertscore_model": None,
            "overrides": ["--data.limit_test=1", "--model.generation.max_new_tokens=3"],
        },
        methods={
            "full": {"config": DEMO, "overrides": ["--model.peft=null"]},
            "lora": {
                "sweep": {
                    "base_config": DEMO,
                    "n_trials": 2,
                    "space": {"model.optimizer.lr": {"choices": [0.005, 0.01]}},
                }
            },
        },
    )


def test_the_study_runs_every_stage_and_a_rerun_skips_them(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    result = run(tmp_path)
    root = tmp_path / "study"
    report = Path(result["report"]).read_text()
    assert "| metric | base | full | lora |" in report and "## Change vs `base` (%)" in report
    records = {name: root / "eval" / name / "eval_record.json" for name in ("base", "full", "lora")}
    stamps = {name: path.stat().st_mtime_ns for name, path in records.items()}
    assert (root / "runs/full/run/fit_done.json").exists()
    # The swept method's views: its plots, linked from the report, and a HParams session per trial.
    plots = sorted(p.name for p in (root / "sweeps/lora/plots").glob("*.png"))
    assert {"parallel_coordinates.png", "importances.png", "history.png"} <= set(plots)
    assert "## Sweeps" in report and "sweeps/lora/plots/parallel_coordinates.png" in report
    assert all(any(trial.glob("*.sweep_hparams_*")) for trial in (root / "sweeps/lora").glob("trial_*"))
    for path in records.values():  # the evaluation's own overrides, after the runs'
        record = json.loads(path.read_text())
        assert record["settings"]["examples"] == 1 and record["settings"]["max_new_tokens"] == 3
    capsys.readouterr()

    lora = json.loads(records["lora"].read_text())  # cut short after its predictions
    del lora["completed"]["rouge"], lora["metrics"]["rougeL"]
    records["lora"].write_text(json.dumps(lora))
    predictions = Path(lora["predictions"]).stat().st_mtime_ns
    run(tmp_path)
    out = capsys.readouterr().out
    assert {name: records[name].stat().st_mtime_ns for name in ("base", "full")} == {
        k: stamps[k] for k in ("base", "full")
    }
    assert (
        "full: fitted already" in out and out.count("evaluated already") == 2 and "rouge still to do" in out
    )
    lora = json.loads(records["lora"].read_text())
    assert (
        "rougeL" in lora["metrics"]
        and lora["pending"] == []
        and Path(lora["predictions"]).stat().st_mtime_ns == predictions
    )
    trials = optuna.load_study(study_name="lora", storage=f"sqlite:///{root / 'sweeps/lora.db'}").trials
    assert len(trials) == 2  # the finished sweep ran no trial again


def test_a_study_needs_a_sweep_or_a_config_per_method(tmp_path):
    with pytest.raises(ValueError, match=r"methods\['x'\] must give a sweep or a config"):
        study(
            base_config=DEMO, methods={"x": {"sweep": "a.yaml", "config": "b.yaml"}}, output_dir=str(tmp_path)
        )


@pytest.mark.parametrize(
    "evaluate, message",
    [
        (
            {"overrides": ["--trainer.max_epochs=3"]},
            r"evaluate.overrides has '--trainer.max_epochs=3': it takes the test",
        ),
        ({"overrides": ["--data.limit_train=8"]}, r"has '--data.limit_train=8'.*not train_split"),
        ({"overrides": ["--model.optimizer.lr=0.1"]}, r"has '--model.optimizer.lr=0.1'"),
        ({"ckpt_path": "x.ckpt"}, r"evaluate has \['ckpt_path'\]: the study sets those itself"),
    ],
)
def test_evaluation_options_the_study_would_ignore_or_clash_with_are_refused(tmp_path, evaluate, message):
    with pytest.raises(ValueError, match=message):
        study(base_config=DEMO, methods={"x": {"config": DEMO}}, output_dir=str(tmp_path), evaluate=evaluate)
    assert not list(tmp_path.iterdir())

"""The study pipeline on a minimal config: base, a fixed run and a sweep, each evaluated, then the
report; a rerun skips every finished stage."""

from pathlib import Path

import optuna
import pytest

from experiments.study import study

ROOT = Path(__file__).resolve().parents[2]
DEMO = str(ROOT / "experiments/configs/demo.yaml")
TINY = ["--data.limit_train=4", "--data.limit_val=2", "--data.limit_test=2", "--data.batch_size=4",
        "--data.max_source_length=48", "--model.max_new_tokens=4", "--trainer.max_epochs=1",
        "--trainer.limit_val_batches=1", "--trainer.enable_model_summary=false"]


def run(tmp_path):
    return study(
        base_config=DEMO, output_dir=str(tmp_path / "study"), overrides=TINY, evaluate={"bertscore_model": None},
        methods={"full": {"config": DEMO, "overrides": ["--model.peft=null"]},
                 "lora": {"sweep": {"base_config": DEMO, "n_trials": 2, "space": {"model.lr": {"choices": [0.005, 0.01]}}}}},
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
    capsys.readouterr()

    run(tmp_path)
    out = capsys.readouterr().out
    assert {name: path.stat().st_mtime_ns for name, path in records.items()} == stamps
    assert "full: fitted already" in out and out.count("evaluated already") == 3
    trials = optuna.load_study(study_name="lora", storage=f"sqlite:///{root / 'sweeps/lora.db'}").trials
    assert len(trials) == 2  # the finished sweep ran no trial again


def test_a_study_needs_a_sweep_or_a_config_per_method(tmp_path):
    with pytest.raises(ValueError, match=r"methods\['x'\] must give a sweep or a config"):
        study(base_config=DEMO, methods={"x": {"sweep": "a.yaml", "config": "b.yaml"}}, output_dir=str(tmp_path))

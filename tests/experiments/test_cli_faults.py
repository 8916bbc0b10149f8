"""Faults and mistakes the CLI meets, each losing no work and named plainly: best.ckpt beside a
periodic save, last.ckpt whatever RunCheckpoint's arguments, a checkpoint's settings never
replacing the command's, predictions never replaced, damaged checkpoints named, temporaries
beside their targets and cleaned up, no empty run directory after a failed command,
checkpointing and progress bars switched off (bad options: test_cli.py)."""

import errno
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import peftcore
from experiments import cli as cli_module
from experiments.callbacks import BestAdapterExport
from experiments.checkpointing import DamagedCheckpoint, LocalCheckpointIO, RunCheckpoint, read_checkpoint
from experiments.cli import lightning_cli

pytestmark = pytest.mark.e2e  # whole commands: `pytest -m "not e2e"` skips them

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "experiments/configs/demo.yaml"
# 4 batches an epoch, no generation (as in test_cli.py).
SMALL = [
    "--data.limit_train=16",
    "--data.limit_val=4",
    "--data.batch_size=4",
    "--data.max_source_length=64",
    "--data.max_target_length=16",
    "--model.generate_in_validation=false",
    "--trainer.limit_val_batches=1",
    "--trainer.max_epochs=2",
    "--trainer.enable_model_summary=false",
]
RUN = Path("runs/demo/version_0")


def demo_config(tmp_path: Path, **replace: str) -> str:
    """demo.yaml with some of its text replaced, written into tmp_path."""
    text = DEMO.read_text()
    for old, new in replace.items():
        assert old in text, old
        text = text.replace(old, new)
    (tmp_path / "demo.yaml").write_text(text)
    return str(tmp_path / "demo.yaml")


def fit(config: str = str(DEMO), *extra: str):
    return lightning_cli(["fit", "--config", config, *SMALL, *extra])


def test_best_ckpt_is_written_when_a_periodic_save_lands_on_a_validation_step(tmp_path, monkeypatch):
    """The demo's case: save_every_n_steps equal to the steps of an epoch (4 here, 20 in demo.yaml)."""
    monkeypatch.chdir(tmp_path)
    config = demo_config(tmp_path, **{"save_every_n_steps: 20": "save_every_n_steps: 4"})
    cli = fit(config)
    checkpoints = tmp_path / RUN / "checkpoints"
    assert {"best.ckpt", "last.ckpt"} <= {p.name for p in checkpoints.iterdir()}
    best = read_checkpoint(checkpoints / "best.ckpt")
    state = next(v for k, v in best["callbacks"].items() if k.startswith("RunCheckpoint"))
    exporter = next(c for c in cli.trainer.callbacks if isinstance(c, BestAdapterExport))
    assert float(state["best_model_score"]) == pytest.approx(exporter.best_val_loss)
    # best.ckpt and best_adapter/ hold the same tensors: the adapter saved from best.ckpt's state is the exported one
    cli.model.load_state_dict(best["state_dict"], strict=False)
    peftcore.save_adapter(cli.model.model, tmp_path / "from_best")
    exported = load_file(tmp_path / RUN / "best_adapter/adapter_model.safetensors")
    again = load_file(tmp_path / "from_best/adapter_model.safetensors")
    assert exported.keys() == again.keys() and all(torch.equal(exported[k], again[k]) for k in exported)
    assert read_checkpoint(checkpoints / "last.ckpt")["global_step"] == 8


def test_last_ckpt_is_written_whatever_save_last_the_config_gives(tmp_path, monkeypatch):
    """The CLI hands RunCheckpoint save_last=None when a config leaves it out."""
    monkeypatch.chdir(tmp_path)
    config = demo_config(
        tmp_path, **{"save_last: true, ": "", "save_every_n_steps: 20": "save_every_n_steps: 3"}
    )
    cli = fit(config, "--trainer.max_epochs=1", "--trainer.limit_val_batches=0")
    saved = read_checkpoint(tmp_path / RUN / "checkpoints/last.ckpt")
    assert saved["global_step"] == 4  # every 3 steps, then at the end of training
    assert cli.trainer.checkpoint_callback.last_model_path == str(RUN / "checkpoints/last.ckpt")
    with pytest.raises(ValueError, match=r"save_last=False is refused: leave save_last unset or true"):
        RunCheckpoint(save_last=False)
    with pytest.raises(ValueError, match=r"save_last='link' is refused"):
        RunCheckpoint(save_last="link")


def test_a_second_save_keeps_the_first_last_ckpt_as_previous(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fit()
    checkpoints = tmp_path / RUN / "checkpoints"
    assert read_checkpoint(checkpoints / "last.ckpt")["global_step"] == 8
    assert read_checkpoint(checkpoints / "previous.ckpt")["global_step"] == 4


@pytest.fixture
def fitted(tmp_path, monkeypatch):
    """One fitted demo run in tmp_path (2 epochs of 4 steps)."""
    monkeypatch.chdir(tmp_path)
    fit()
    return tmp_path / RUN


def test_an_explicit_checkpoint_file_keeps_the_commands_settings(fitted, tmp_path):
    ckpt = str(fitted / "checkpoints/best.ckpt")
    out = tmp_path / "mine.jsonl"
    cli = lightning_cli(
        [
            "predict",
            "--config",
            str(DEMO),
            *SMALL,
            "--data.limit_test=2",
            "--model.generation.max_new_tokens=4",
            "--model.generation.num_beams=2",
            f"--model.predictions_path={out}",
            "--ckpt_path",
            ckpt,
        ]
    )
    assert cli.model.generation.num_beams == 2 and cli.model.generation.max_new_tokens == 4
    assert len(out.read_text().splitlines()) == 2


@pytest.mark.parametrize(
    "option, message",
    [
        ("--model.peft.init_args.r=8", r"model\.peft: LoRAConfig r=16 in the checkpoint, r=8 here"),
        (
            "--model.pretrained=t5-small",
            r"model\.pretrained: 'bundled:t5-tiny-dialogue' in the checkpoint, 't5-small' here",
        ),
    ],
)
def test_a_checkpoint_refuses_another_base_or_method_by_name(fitted, option, message, capsys):
    with pytest.raises(SystemExit) as info:
        lightning_cli(
            [
                "test",
                "--config",
                str(DEMO),
                *SMALL,
                option,
                "--ckpt_path",
                str(fitted / "checkpoints/last.ckpt"),
            ]
        )
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) < 10, err
    import re

    assert re.search(message, err), err


def test_a_command_naming_no_model_takes_the_checkpoints(fitted):
    cli = lightning_cli(
        [
            "test",
            "--data.limit_test=2",
            "--data.max_source_length=64",
            "--model.generation.max_new_tokens=4",
            "--trainer.accelerator=cpu",
            "--trainer.enable_progress_bar=false",
            "--ckpt_path",
            str(fitted / "checkpoints/last.ckpt"),
        ]
    )
    assert cli.model.hparams.pretrained == "bundled:t5-tiny-dialogue"
    injected = cli.model.model.peftcore_config
    assert isinstance(injected, peftcore.LoRAConfig) and injected.r == 16
    assert cli.model.generation.max_new_tokens == 4  # the command's own settings still win


def test_evaluate_reads_a_checkpoint_as_the_cli_does(fitted, tmp_path):
    """weights_only=True with the damaged file named, and a config of another method refused by name."""
    from experiments.__main__ import main

    ckpt = str(fitted / "checkpoints/last.ckpt")
    evaluate = [
        "evaluate",
        "--train_config",
        str(DEMO),
        "--run_name",
        "x",
        "--output_dir",
        str(tmp_path / "eval"),
        "--bertscore_model",
        "null",
        "--ckpt_path",
        ckpt,
    ]
    with pytest.raises(SystemExit, match=r"model\.peft: LoRAConfig r=16 in the checkpoint, r=8 here"):
        main([*evaluate, "--overrides", '["--model.peft.init_args.r=8"]'])
    (fitted / "checkpoints/last.ckpt").write_bytes(b"")
    with pytest.raises(
        SystemExit, match=r"last\.ckpt is damaged or not a checkpoint of this project \(it is empty\)"
    ):
        main([*evaluate, "--overrides", '["--data.limit_test=2"]'])


def test_predict_keeps_every_commands_output(fitted):
    for _ in range(2):
        lightning_cli(
            [
                "predict",
                "--config",
                str(DEMO),
                *SMALL,
                "--data.limit_test=2",
                "--model.generation.max_new_tokens=4",
                "--ckpt_path",
                "last",
            ]
        )
    assert sorted(p.name for p in fitted.glob("predictions*.jsonl")) == [
        "predictions-2.jsonl",
        "predictions.jsonl",
    ]
    assert len((fitted / "predictions.jsonl").read_text().splitlines()) == 2


@pytest.mark.parametrize("damage", ["truncated", "empty", "random"])
def test_a_damaged_checkpoint_is_named_with_the_runs_others(fitted, damage, capsys):
    last = fitted / "checkpoints/last.ckpt"
    data = last.read_bytes()
    last.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "random": os.urandom(4096)}[damage])
    with pytest.raises(SystemExit) as info:
        fit(str(DEMO), "--ckpt_path", "last")
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"{RUN}/checkpoints/last.ckpt is damaged or not a checkpoint" in err and "weights_only" not in err
    assert "best.ckpt" in err and "previous.ckpt" in err and len(err.splitlines()) < 10, err
    with pytest.raises(DamagedCheckpoint):
        read_checkpoint(last)
    resumed = fit(
        str(DEMO), "--ckpt_path", str(fitted / "checkpoints/previous.ckpt"), "--trainer.max_epochs=3"
    )
    assert resumed.trainer.global_step == 12  # resumed at step 4: two more epochs of 4


def test_checkpoints_never_touch_tmpdir_and_stray_temporaries_go(tmp_path, monkeypatch):
    """A full $TMPDIR (every temporary file there fails) does not stop a checkpoint; the
    temporary a kill -9 left beside last.ckpt is removed when the run resumes."""
    monkeypatch.chdir(tmp_path)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device (TMPDIR)")

    monkeypatch.setattr(tempfile, "mkstemp", full)
    fit(str(DEMO), "--trainer.max_epochs=1")
    checkpoints = tmp_path / RUN / "checkpoints"
    assert read_checkpoint(checkpoints / "last.ckpt")["global_step"] == 4
    stray = checkpoints / ".last.ckpt.0123456789ab.tmp"
    stray.write_bytes(b"half a checkpoint")
    fit(str(DEMO), "--ckpt_path", "last")
    assert (
        not stray.exists() and sorted(p.name for p in checkpoints.iterdir() if p.name.startswith(".")) == []
    )


def test_a_full_disk_names_the_checkpoint_and_keeps_the_previous_one(tmp_path, monkeypatch):
    io = LocalCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(2)}}, path)

    def full(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(
        OSError,
        match=rf"could not write the checkpoint {path}: No space left on device; the previous "
        r"last\.ckpt is kept",
    ):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(2)}}, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    assert torch.equal(io.load_checkpoint(path)["state_dict"]["w"], torch.ones(2))


def test_a_failed_command_leaves_no_run_directory_and_fit_names_its_own(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad").mkdir()
    row = {"id": "1", "turns": [], "summaries": ["a summary"]}  # an empty dialogue
    for split in ("train", "valid", "test"):
        (tmp_path / "bad" / f"{split}.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(SystemExit) as info:
        fit(str(DEMO), "--data.dataset=bad")
    assert info.value.code == 2 and not (tmp_path / "runs").exists()
    err = capsys.readouterr().err
    assert "bad/train.jsonl, line 1" in err and "dialogue" in err and "Traceback" not in err, err
    with pytest.raises(SystemExit):
        fit(str(DEMO), "--ckpt_path", "missing.ckpt")
    assert not (tmp_path / "runs").exists()
    said = []
    monkeypatch.setattr(cli_module, "rank_zero_info", lambda message: said.append(message))
    fit(str(DEMO), "--trainer.max_epochs=1")
    assert said[0] == f"fit: run directory {RUN}"
    assert (
        said[-1]
        == f"fit: done, run directory {RUN}; resume or extend it with --ckpt_path {RUN}/checkpoints/last.ckpt"
    )


def test_checkpointing_and_progress_bar_switched_off_on_the_command_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = fit(
        str(DEMO),
        "--trainer.max_epochs=1",
        "--trainer.enable_checkpointing=false",
        "--trainer.enable_progress_bar=false",
    )
    assert cli.trainer.checkpoint_callback is None and cli.trainer.progress_bar_callback is None
    assert cli.trainer.global_step == 4 and not (tmp_path / RUN / "checkpoints").exists()


def test_the_cli_starts_without_the_rouge_and_nltk_imports():
    """ROUGE's imports (rouge-score pulls in nltk, about 0.4 s) wait until something is scored."""
    code = (
        "import sys, experiments.cli; print(sorted(m for m in ('nltk', 'rouge_score') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr


def test_any_garbage_is_named_damaged(tmp_path):
    """Random bytes make torch's unpickler raise all sorts of errors (IndexError, TypeError...):
    each is the same named refusal."""
    import random

    path = tmp_path / "last.ckpt"
    for seed in range(200):
        path.write_bytes(random.Random(seed).randbytes(4096))
        with pytest.raises(DamagedCheckpoint):
            read_checkpoint(path)

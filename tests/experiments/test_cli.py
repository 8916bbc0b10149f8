"""The CLI loses no work and names every mistake: runs own their directories, Ctrl-C and errors
leave a checkpoint that resumes exactly, fast_dev_run writes nothing, a bad method config or
Lightning's --optimizer is refused by name, and every command is listed."""

import json
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from experiments.__main__ import COMMANDS, main
from experiments.cli import lightning_cli

pytestmark = pytest.mark.e2e  # whole commands: `pytest -m "not e2e"` skips them

ROOT = Path(__file__).resolve().parents[2]
DEMO = str(ROOT / "experiments/configs/demo.yaml")
# 4 batches an epoch, no generation: a run of 2 epochs is 8 steps in seconds.
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


class LossRecorder(Callback):
    """Records each step's training loss (named by the CLI: test_cli.LossRecorder)."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


class InterruptAt(Callback):
    """Ctrl-C (a real SIGINT) or a crash while step ``step`` is in flight."""

    def __init__(self, step: int, how: str = "sigint") -> None:
        self.step, self.how = step, how

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step + 1 == self.step:
            if self.how == "sigint":
                os.kill(os.getpid(), signal.SIGINT)  # the handler runs at once; the step then finishes
            else:
                raise RuntimeError("boom: a failing step")


def callback(name: str, **init_args) -> str:
    return "--trainer.callbacks+=" + json.dumps({"class_path": f"test_cli.{name}", "init_args": init_args})


def fit(*extra: str):
    return lightning_cli(["fit", "--config", DEMO, *SMALL, callback("LossRecorder"), *extra])


def losses_of(cli) -> list[float]:
    return next(c for c in cli.trainer.callbacks if isinstance(c, LossRecorder)).losses


def test_two_fits_from_one_config_keep_both_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fit("--trainer.max_epochs=1")
    first = (tmp_path / "runs/demo/version_0/checkpoints/last.ckpt").read_bytes()
    fit("--trainer.max_epochs=1", "--model.optimizer.lr=0.01")
    assert (tmp_path / "runs/demo/version_0/checkpoints/last.ckpt").read_bytes() == first
    for version in ("version_0", "version_1"):
        run = tmp_path / "runs/demo" / version
        assert {p.name for p in (run / "checkpoints").iterdir()} == {"best.ckpt", "last.ckpt"}
        assert (run / "config.yaml").exists() and (run / "best_adapter/adapter_config.json").exists()
        assert any(p.name.startswith("events.out.tfevents") for p in run.iterdir())


def test_fast_dev_run_writes_nothing_and_leaves_a_finished_run_alone(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fit("--trainer.max_epochs=1")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    lightning_cli(["fit", "--config", DEMO, *SMALL, "--trainer.fast_dev_run=true"])
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before


@pytest.mark.parametrize("how", ["sigint", "exception"])
def test_an_interrupted_fit_resumes_with_the_losses_of_an_uninterrupted_one(tmp_path, monkeypatch, how):
    """Stopped in the middle of the second epoch (step 7 of 8), resumed with --ckpt_path last."""
    monkeypatch.chdir(tmp_path)
    straight = losses_of(fit("--trainer.logger.init_args.name=straight"))
    assert len(straight) == 8
    with pytest.raises((SystemExit, RuntimeError)) as info:
        fit(callback("InterruptAt", step=7, how=how))
    if how == "sigint":
        assert info.value.code == 1  # Lightning's exit status after a Ctrl-C
    saved = torch.load(tmp_path / "runs/demo/version_0/checkpoints/last.ckpt", weights_only=False)
    assert saved["global_step"] == (7 if how == "sigint" else 6)  # the step in flight finished / is redone
    resumed = fit("--ckpt_path", "last")
    assert losses_of(resumed) == pytest.approx(straight[saved["global_step"] :], abs=1e-6)
    assert sorted(p.name for p in (tmp_path / "runs/demo").iterdir()) == [
        "version_0"
    ]  # the same run continued
    assert resumed.trainer.logger.log_dir == str(Path("runs/demo/version_0"))


class PeekAt(Callback):
    """Reads the global step of ``path`` when step ``step`` starts."""

    def __init__(self, step: int, path: str) -> None:
        self.step, self.path, self.seen = step, path, None

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step + 1 == self.step:
            self.seen = torch.load(self.path, weights_only=False)["global_step"]


def test_a_checkpoint_every_n_steps(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = Path(DEMO).read_text().replace("save_every_n_steps: 20", "save_every_n_steps: 3")
    assert "save_every_n_steps: 3" in config
    (tmp_path / "every3.yaml").write_text(config)
    cli = lightning_cli(
        [
            "fit",
            "--config",
            "every3.yaml",
            *SMALL,
            "--trainer.max_epochs=1",
            callback("PeekAt", step=4, path="runs/demo/version_0/checkpoints/last.ckpt"),
        ]
    )
    assert next(c for c in cli.trainer.callbacks if isinstance(c, PeekAt)).seen == 3


def test_test_and_predict_land_in_the_run_they_come_from(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fit("--trainer.max_epochs=1")
    lightning_cli(
        [
            "test",
            "--config",
            DEMO,
            *SMALL,
            "--data.limit_test=2",
            "--model.generation.max_new_tokens=4",
            "--ckpt_path",
            "last",
        ]
    )
    lightning_cli(
        [
            "predict",
            "--config",
            DEMO,
            *SMALL,
            "--data.limit_test=2",
            "--model.generation.max_new_tokens=4",
            "--ckpt_path",
            "best",
        ]
    )
    run = tmp_path / "runs/demo/version_0"
    assert sorted(p.name for p in (tmp_path / "runs/demo").iterdir()) == ["version_0"]
    assert len((run / "predictions.jsonl").read_text().splitlines()) == 2
    configs = sorted(p.name for p in run.glob("config*.yaml"))
    assert configs == ["config.predict-1.yaml", "config.test-1.yaml", "config.yaml"]  # nothing overwritten
    assert "max_epochs: 1" in (run / "config.yaml").read_text()


def test_a_dirpath_holding_another_runs_checkpoints_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    checkpointing = "--trainer.callbacks+=" + json.dumps(
        {
            "class_path": "experiments.checkpointing.RunCheckpoint",
            "init_args": {"dirpath": "shared", "save_last": True},
        }
    )
    fit("--trainer.max_epochs=1", checkpointing)
    with pytest.raises(ValueError, match=r"shared already holds checkpoints of another run \(.*last\.ckpt\)"):
        fit("--trainer.max_epochs=1", checkpointing)


def test_lightnings_model_checkpoint_is_refused_for_what_it_would_lose(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        fit("--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint")
    assert "use experiments.checkpointing.RunCheckpoint" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argument, message",
    [
        (
            "--model.peft.init_args.lora_alpah=3",
            r"LoRAConfig has no field 'lora_alpah'; peft's 'lora_alpha' \(did "
            r"you mean it\?\) is peftcore's 'alpha'\. Its fields: r, alpha, dropout",
        ),
        (
            "--model.peft.init_args.drop=3",
            r"LoRAConfig has no field 'drop'; did you mean 'dropout'\. Its fields",
        ),
        (
            "--model.peft.init_args.lora_alpha=3",
            r"LoRAConfig has no field 'lora_alpha'; peft's 'lora_alpha' is "
            r"peftcore's 'alpha'",
        ),
        ("--model.peft.init_args.r=0", r"LoRAConfig\.r must be a positive integer, got 0"),
        (
            '--model.peft={"class_path": "peftcore.LoraConfig"}',
            r"'peftcore.LoraConfig' is not a method config; the "
            r"methods are peftcore.LoRAConfig",
        ),
        (
            "--model.peft.init_args.target_modules=[qq]",
            r"target_modules 'qq' matches no module.*Closest match: 'q'",
        ),
        (
            "--optimizer=SGD",
            r"Lightning's --optimizer is not used here.*--model.optimizer.name \(adamw \| paged_adamw\)",
        ),
        ("--lr_scheduler=StepLR", r"Lightning's --lr_scheduler is not used here"),
        # values torch or generate would take with a confusing error, or without one
        ("--model.optimizer.lr=-1", r"model\.optimizer\.lr must be a positive number .*got -1\.0"),
        ("--model.generation.num_beams=0", r"model\.generation\.num_beams must be an integer >= 1 .*got 0"),
        (
            "--model.generation.max_new_tokens=-5",
            r"model\.generation\.max_new_tokens must be an integer >= 1 .*got -5",
        ),
        (
            "--model.optimizer.betas=[0.9, 1.5]",
            r"model\.optimizer\.betas must be two numbers in \[0, 1\).*got \[0\.9, 1\.5\]",
        ),
        (
            "--model.optimizer.weight_decay=-0.5",
            r"model\.optimizer\.weight_decay must be a number >= 0 .*got -0\.5",
        ),
        ("--model.dropout_rate=1.0", r"model\.dropout_rate must be in \[0, 1\).*got 1\.0"),
        # the options grouped in model.optimizer and model.generation, given the old flat way
        ("--model.lr=0.01", r"model\.lr is now model\.optimizer\.lr"),
        ("--model.num_beams=4", r"model\.num_beams is now model\.generation\.num_beams"),
        ("--model.optimizer=paged_adamw", r"model\.optimizer is a section now.*--model\.optimizer\.name"),
    ],
)
def test_a_mistake_is_named(argument, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        lightning_cli(["fit", "--config", DEMO, argument, "--trainer.fast_dev_run=true"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) < 10, err  # a message, not a traceback
    import re

    assert re.search(message, err), err


def test_fit_help_lists_the_methods_fields(capsys):
    with pytest.raises(SystemExit):
        lightning_cli(["fit", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert (
        "LoRAConfig (r, alpha, dropout," in help_text
        and "PromptTuningConfig (num_virtual_tokens," in help_text
    )
    with pytest.raises(SystemExit):
        lightning_cli(["fit", "--model.peft.help", "LoRAConfig"])
    out = capsys.readouterr().out
    assert "--model.peft.init_args.alpha" in out or "--model.peft.alpha" in out
    assert "rank_pattern" in out and "layers_to_transform" in out


def test_every_command_is_listed(capsys):
    main(["--help"])
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS) and {"evaluate", "report"} <= set(COMMANDS)
    with pytest.raises(SystemExit):
        main(["frobnicate"])
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


def test_no_warning_about_args_and_the_command_line(tmp_path):
    """The warning came from building a CLI from code while sys.argv held the user's command."""
    result = subprocess.run(
        [sys.executable, "-m", "experiments", "fit", "--config", DEMO, "--print_config"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0 and "args parameter" not in result.stderr
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # programmatic use with other args
        with pytest.raises(SystemExit):
            lightning_cli(["fit", "--config", DEMO, "--print_config"])


@pytest.mark.parametrize("optimizer", ["adamw", "paged_adamw"])
def test_loraplus_from_the_command_line(tmp_path, monkeypatch, optimizer):
    monkeypatch.chdir(tmp_path)
    cli = fit(
        "--trainer.max_epochs=1",
        "--model.optimizer.loraplus_lr_ratio=16",
        f"--model.optimizer.name={optimizer}",
        "--model.optimizer.lr=0.002",
    )
    model = cli.model.model
    names = {id(p): n for n, p in model.named_parameters()}
    lrs = {names[id(p)]: g["initial_lr"] for g in cli.trainer.optimizers[0].param_groups for p in g["params"]}
    assert {lr for n, lr in lrs.items() if ".lora_B." in n} == {0.032}
    assert {lr for n, lr in lrs.items() if ".lora_A." in n} == {0.002}
    with pytest.raises(SystemExit):
        fit("--model.optimizer.loraplus_lr_ratio=0")

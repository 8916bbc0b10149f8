"""Seq2SeqFineTuner and the CLI: configs parse, fit runs, resume is exact, checkpoints hold only the
adapter, the exported adapter loads, bad settings are refused, DDP runs on 2 CPU processes."""

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import peft
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

import peftcore
from experiments.callbacks import StepTimer
from experiments.checkpointing import RunCheckpoint
from experiments.cli import lightning_cli
from experiments.data import DialogSummaryDataModule
from experiments.model import build_model
from experiments.module import Seq2SeqFineTuner
from experiments.settings import OptimizerSettings

pytestmark = pytest.mark.e2e  # whole commands: `pytest -m "not e2e"` skips them

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "experiments" / "configs").glob("*.yaml"))
LORA = peftcore.LoRAConfig(r=4, alpha=8, target_modules=("q", "v"))


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_every_shipped_config_round_trips_through_print_config(config, capsys, tmp_path):
    with pytest.raises(SystemExit) as info:
        lightning_cli(["fit", "--config", str(config), "--print_config"])
    assert info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "model:" in printed and "trainer:" in printed
    again = tmp_path / "printed.yaml"
    again.write_text(printed)
    with pytest.raises(SystemExit):
        lightning_cli(["fit", "--config", str(again), "--print_config"])
    assert capsys.readouterr().out == printed


def test_study_configs_hold_the_study_settings(capsys):
    def printed(name):
        with pytest.raises(SystemExit):
            lightning_cli(["fit", "--config", str(ROOT / "experiments/configs" / name), "--print_config"])
        return capsys.readouterr().out

    lora, qlora, ia3 = printed("lora.yaml"), printed("qlora.yaml"), printed("ia3.yaml")
    assert "r: 32" in lora and "alpha: 64" in lora and "lm_head" in lora and "max_epochs: 3" in lora
    assert "r: 16" in qlora and "double_quant: true" in qlora and "paged_adamw" in qlora
    assert "IA3Config" in ia3 and "max_epochs: 5" in ia3


def test_a_typo_in_a_config_key_is_named(capsys):
    with pytest.raises(SystemExit):
        lightning_cli(
            ["fit", "--config", str(ROOT / "experiments/configs/demo.yaml"), "--model.learning_rate=0.1"]
        )
    assert "learning_rate" in capsys.readouterr().err


def test_fit_through_the_cli_entry_point(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = lightning_cli(
        [
            "fit",
            "--config",
            str(ROOT / "experiments/configs/demo.yaml"),
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=3",
            "--trainer.limit_val_batches=1",
            "--data.limit_train=12",
            "--data.limit_val=4",
            "--data.batch_size=4",
            "--model.generation.max_new_tokens=8",
        ]
    )
    assert cli.trainer.global_step == 3
    assert (tmp_path / "runs/demo/version_0/checkpoints/last.ckpt").exists()
    assert "val/rougeL" in cli.trainer.callback_metrics
    adapter = Path(cli.trainer.logger.log_dir) / "best_adapter"
    fresh = build_model("bundled:t5-tiny-dialogue", None, False, False, 0.0)
    reference = copy.deepcopy(fresh)
    peftcore.load_adapter(fresh, adapter)
    trained = cli.model.model.eval()
    x = torch.randint(2, 1000, (2, 9))
    with torch.no_grad():
        expected = trained(input_ids=x, labels=x).logits
        torch.testing.assert_close(fresh.eval()(input_ids=x, labels=x).logits, expected)
        # and peft reads the demo's adapter as the same model
        theirs = peft.PeftModel.from_pretrained(reference, adapter).eval()
        torch.testing.assert_close(theirs(input_ids=x, labels=x).logits, expected, atol=1e-5, rtol=1e-5)


class LossRecorder(Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


class StopAfterFirstEpoch(Callback):
    """An interruption: the run is configured for 2 epochs (same LR schedule) but stops after 1."""

    def on_train_epoch_end(self, trainer, module):
        trainer.should_stop = True


class RaiseAfterStep(Callback):
    """A callback that fails after the optimizer step of a batch (a NaN guard, a user's hook)."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError(f"raised after step {self.step}")


def tiny_run(
    tmp_path,
    max_epochs,
    ckpt_path=None,
    interrupt=False,
    checkpoint=None,
    extra_callbacks=(),
    shape="t5-tiny",
    accelerator="cpu",
    precision="32-true",
    data_kwargs=None,
    deterministic=False,
    gradient_clip_val=None,
    **module_kwargs,
):
    L.seed_everything(0)
    module = Seq2SeqFineTuner(
        shape=shape,
        random_init=True,
        dropout_rate=0.0,
        peft=module_kwargs.pop("peft", LORA),
        optimizer=OptimizerSettings(lr=module_kwargs.pop("lr", 1e-2)),
        generate_in_validation=False,
        **module_kwargs,
    )
    data = DialogSummaryDataModule(
        **(
            data_kwargs
            or dict(limit_train=16, limit_val=4, batch_size=4, max_source_length=64, max_target_length=16)
        )
    )
    recorder = LossRecorder()
    trainer = L.Trainer(
        max_epochs=max_epochs,
        accelerator=accelerator,
        devices=1,
        precision=precision,
        logger=False,
        deterministic=deterministic,
        gradient_clip_val=gradient_clip_val,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[recorder, checkpoint or ModelCheckpoint(dirpath=tmp_path, save_last=True)]
        + [StopAfterFirstEpoch()] * interrupt
        + list(extra_callbacks),
    )
    trainer.fit(module, data, ckpt_path=ckpt_path)
    return recorder.losses, trainer, module


def test_an_exception_after_a_step_saves_that_batch_as_done(tmp_path):
    """The step of batch 3 ran before a callback raised: last.ckpt says 3 batches are done, and
    the resumed run goes on with batch 4 instead of training batch 3 a second time."""
    straight, _, _ = tiny_run(tmp_path / "a", max_epochs=2)
    with pytest.raises(RuntimeError, match="raised after step 3"):
        tiny_run(
            tmp_path / "b",
            max_epochs=2,
            checkpoint=RunCheckpoint(dirpath=tmp_path / "b"),
            extra_callbacks=[RaiseAfterStep(3)],
        )
    resumed, _, _ = tiny_run(
        tmp_path / "c", max_epochs=2, checkpoint=RunCheckpoint(), ckpt_path=tmp_path / "b" / "last.ckpt"
    )
    assert len(straight) == 8
    assert resumed == pytest.approx(straight[3:], abs=1e-6)


def test_resume_continues_exactly_and_checkpoints_hold_only_the_adapter(tmp_path):
    straight, _, _ = tiny_run(tmp_path / "a", max_epochs=2)
    first, _, _ = tiny_run(tmp_path / "b", max_epochs=2, interrupt=True)
    resumed, _, _ = tiny_run(tmp_path / "c", max_epochs=2, ckpt_path=tmp_path / "b" / "last.ckpt")
    assert len(straight) == 8 and first == straight[:4]
    assert resumed == pytest.approx(straight[4:], abs=1e-6)
    assert straight[-1] < straight[0]
    state = torch.load(tmp_path / "b" / "last.ckpt", weights_only=False)["state_dict"]
    assert state and all(".lora_A." in k or ".lora_B." in k for k in state)
    assert "optimizer_states" in torch.load(tmp_path / "b" / "last.ckpt", weights_only=False)


def test_resuming_with_another_method_is_refused(tmp_path):
    tiny_run(tmp_path / "b", max_epochs=1)
    L.seed_everything(0)
    module = Seq2SeqFineTuner(shape="t5-tiny", random_init=True, peft=peftcore.IA3Config())
    checkpoint = torch.load(tmp_path / "b" / "last.ckpt", weights_only=False)
    with pytest.raises(ValueError, match="lacks .* trainable tensors"):
        module.on_load_checkpoint(checkpoint)


@pytest.mark.parametrize(
    "lora",
    [LORA, peftcore.LoRAConfig(r=4, alpha=8, dropout=0.1, target_modules=("q", "v"))],
    ids=["no dropout", "LoRA dropout"],
)
def test_gradient_checkpointing_keeps_adapter_gradients(lora):
    """With LoRA dropout too: the recomputed forward must draw the same dropped positions."""

    def grads(checkpointing):
        L.seed_everything(0)
        module = Seq2SeqFineTuner(
            shape="t5-tiny",
            random_init=True,
            dropout_rate=0.0,
            peft=lora,
            gradient_checkpointing=checkpointing,
        )
        module.model.train()
        batch = {
            "input_ids": torch.randint(2, 1000, (2, 12)),
            "attention_mask": torch.ones(2, 12, dtype=torch.long),
            "labels": torch.randint(2, 1000, (2, 5)),
        }
        module(batch).backward()
        return {n: p.grad for n, p in module.model.named_parameters() if p.requires_grad}

    plain, checkpointed = grads(False), grads(True)
    assert all(g is not None and g.abs().sum() > 0 for n, g in checkpointed.items() if "lora_B" in n)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(shape="t5-tiny"), "set random_init: true"),
        (dict(), "set pretrained"),
        (dict(pretrained="google-t5/t5-base", shape="t5-tiny"), "not both"),
        (dict(shape="t5-huge", random_init=True), "unknown shape 't5-huge'"),
        (
            dict(shape="t5-tiny", random_init=True, optimizer="sgd"),
            "model.optimizer must be OptimizerSettings",
        ),
    ],
)
def test_bad_model_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Seq2SeqFineTuner(**kwargs)


def test_ddp_on_two_cpu_processes(tmp_path):
    """Two gloo processes: Lightning re-creates the length-grouped batch sampler over its own
    DistributedSampler, and the two ranks train on disjoint shards."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(Path(__file__).parent)])}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments",
            "fit",
            "--config",
            str(ROOT / "experiments/configs/demo.yaml"),
            "--trainer.strategy=ddp",
            "--trainer.devices=2",
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=2",
            "--trainer.limit_val_batches=1",
            "--data.limit_train=16",
            "--data.limit_val=4",
            "--data.batch_size=4",
            "--model.generation.max_new_tokens=4",
            "--trainer.callbacks+=rank_recorder.RankRecorder",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "runs/demo/version_0/checkpoints/last.ckpt").exists()
    assert "distributed_backend=gloo" in result.stderr + result.stdout
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank in ranks:
        assert (rank["batch_sampler"], rank["sampler"]) == ("LengthGroupedBatchSampler", "DistributedSampler")
        assert len(rank["ids"]) == 8  # 2 batches of 4: each rank's half of the 16 dialogues
    assert not set(ranks[0]["ids"]) & set(ranks[1]["ids"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_mixed_fit_of_t5_base_resumes_exactly(tmp_path):
    """t5-base shape (random init), LoRA r=16 on q,v, bf16-mixed on one GPU, the whole TweetSumm
    training split (110 steps of 8 dialogues an epoch) for 2 epochs; interrupted after the first
    epoch and resumed, it continues with the same losses. On a GPU that takes
    ``Trainer(deterministic=True)``: the default attention backward (scaled_dot_product_attention's
    fused kernels) accumulates with atomics, so two identical runs drift apart in the last bits."""
    run = dict(
        shape="t5-base",
        accelerator="cuda",
        precision="bf16-mixed",
        lr=1e-3,
        deterministic=True,
        peft=peftcore.LoRAConfig(r=16, alpha=32, target_modules=("q", "v")),
        data_kwargs=dict(batch_size=8, max_source_length=512, max_target_length=128),
    )
    straight, trainer, _ = tiny_run(tmp_path / "a", max_epochs=2, **run)
    first, _, _ = tiny_run(tmp_path / "b", max_epochs=2, interrupt=True, **run)
    resumed, _, _ = tiny_run(tmp_path / "c", max_epochs=2, ckpt_path=tmp_path / "b" / "last.ckpt", **run)
    assert trainer.precision == "bf16-mixed" and trainer.strategy.root_device.type == "cuda"
    assert len(straight) == 220 and len(first) == 110 and len(resumed) == 110
    assert all(math.isfinite(loss) for loss in straight), straight
    assert first == pytest.approx(straight[:110], abs=1e-5)
    assert resumed == pytest.approx(straight[110:], abs=1e-5)
    print(
        f"losses: first {straight[0]:.3f}, last {straight[-1]:.3f}; resumed run identical: {resumed == straight[110:]}"
    )
    assert sum(straight[-10:]) < 0.9 * sum(straight[:10])


def test_adamw_is_fused_unless_lightning_would_refuse_it(tmp_path):
    _, trainer, _ = tiny_run(tmp_path / "a", max_epochs=1)
    assert trainer.optimizers[0].defaults["fused"] is True
    _, trainer, _ = tiny_run(tmp_path / "b", max_epochs=1, precision="bf16-mixed", gradient_clip_val=1.0)
    assert not trainer.optimizers[0].defaults["fused"] and trainer.optimizers[0].defaults["foreach"]


def test_compiled_fit_trains_like_the_eager_one_and_reports_its_first_step(tmp_path):
    from torch._dynamo.utils import counters

    eager, _, _ = tiny_run(tmp_path / "a", max_epochs=1)
    counters.clear()
    compiled, trainer, _ = tiny_run(tmp_path / "b", max_epochs=1, compile=True)
    assert counters["stats"]["unique_graphs"] >= 1  # dynamo compiled the loss, not fell back to eager
    assert compiled == pytest.approx(eager, rel=1e-4)
    timer = next(c for c in trainer.callbacks if isinstance(c, StepTimer))
    assert timer.compiled and timer.first_step_seconds > 0


def test_efficiency_carries_the_studys_convention_beside_ours():
    module = Seq2SeqFineTuner(
        shape="t5-tiny",
        random_init=True,
        peft=LORA,
        quantization=peftcore.NF4Config(compute_dtype=torch.float32),
    )
    stats = module.efficiency()
    stored = peftcore.count_parameters(module.model, stored=True)
    packed = sum(m.weight_packed.numel() for m in module.model.modules() if isinstance(m, peftcore.NF4Linear))
    assert (
        stats["all_params"] - stats["all_params_stored"] == packed
    )  # each 4-bit pair of values: one element
    assert stats["trainable_percent_stored"] == stored.trainable_percent > stats["trainable_params_percent"]
    assert stats["memory_footprint_stored"] < stats["memory_footprint"]  # without the scales


def test_a_method_that_cannot_recompute_activations_refuses_gradient_checkpointing():
    with pytest.raises(ValueError, match="gradient_checkpointing with PrefixTuning"):
        Seq2SeqFineTuner.check_settings(
            shape="t5-tiny", random_init=True, peft=peftcore.PrefixTuningConfig(), gradient_checkpointing=True
        )
    Seq2SeqFineTuner.check_settings(shape="t5-tiny", random_init=True, peft=LORA, gradient_checkpointing=True)

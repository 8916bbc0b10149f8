"""End to end: training throughput of ``experiments fit`` next to the script a peft user would write.

    python -m benchmarks.bench_end_to_end [--device cuda] [--shape t5-base] [--steps 120] [--rounds 2]

Both train the study's LoRA (``experiments/configs/lora.yaml``: r=32, alpha=64, dropout 0.05 on
q,k,v,o,wi,wo,lm_head) on the bundled TweetSumm for the same number of optimizer steps, from the
same randomly initialised model of ``--shape``, with the same tokenized examples (our data module's:
512 source / 128 target tokens), batch size 8, AdamW with the same learning rate, warm-up, weight
decay and gradient clipping, and the same precision (bf16 autocast on CUDA, fp32 on CPU).

* ours: ``python -m experiments fit --config experiments/configs/lora.yaml`` with the model built
  from the shape instead of the hub (run through the same CLI function, in a scratch directory);
* the reference: transformers ``Seq2SeqTrainer`` + peft ``get_peft_model``, with
  ``DataCollatorForSeq2Seq`` and the Trainer's default random batches.

Samples per second are counted from the end of the ``--warmup`` th step to the end of training, so
start-up, data loading and compilation stay out. The runs alternate (ours, theirs, ours, ...) for
``--rounds`` rounds, the first of which only warms the process up when there are several; the
ratio is ours / reference of samples per second (above 1: ours is faster), with the range over rounds.
Each side's padding fraction is reported: fewer padded tokens is part of what ours does differently.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.common import machine, print_table, write_result

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "experiments" / "configs" / "lora.yaml"
BATCH = 8


class _Clock:
    """Wall time from the end of step ``warmup`` to the end of the last step, synchronised."""

    def __init__(self, warmup: int, device: torch.device) -> None:
        self.warmup, self.device = warmup, device
        self.steps = 0
        self.started = self.ended = None
        self.padding: list[float] = []

    def step_end(self) -> None:
        self.steps += 1
        if self.steps == self.warmup:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.started = time.perf_counter()

    def end(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.ended = time.perf_counter()

    def samples_per_s(self) -> float:
        return (self.steps - self.warmup) * BATCH / (self.ended - self.started)


def run_ours(shape: str, steps: int, warmup: int, device: torch.device, workdir: Path) -> dict:
    from lightning.pytorch.callbacks import Callback

    from experiments.cli import lightning_cli

    clock = _Clock(warmup, device)

    losses = []

    class Timer(Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            clock.padding.append(float(batch["padding_fraction"]))
            losses.append(outputs["loss"].detach())  # read after training: no synchronisation per step
            clock.step_end()

        def on_train_end(self, trainer, module):
            clock.end()

    precision = "bf16-mixed" if device.type == "cuda" else "32-true"
    cwd = os.getcwd()
    os.chdir(workdir)  # the config's checkpoints and logs land in the scratch directory
    try:
        cli = lightning_cli([
            "--config", str(CONFIG), "--model.pretrained=null", f"--model.shape={shape}",
            "--model.random_init=true", f"--trainer.max_steps={steps}", "--trainer.limit_val_batches=0",
            "--trainer.num_sanity_val_steps=0", f"--trainer.accelerator={device.type}", f"--trainer.precision={precision}",
            f"--data.batch_size={BATCH}",
        ], run=False)
        cli.trainer.callbacks.append(Timer())
        cli.trainer.fit(cli.model, cli.datamodule)
    finally:
        os.chdir(cwd)
    return dict(samples_per_s=round(clock.samples_per_s(), 2), steps=clock.steps,
                padding_fraction=round(statistics.mean(clock.padding), 4),
                loss_every_10_steps=[round(float(loss), 4) for loss in losses[9::10]])


def run_reference(shape: str, steps: int, warmup: int, device: torch.device, workdir: Path) -> dict:
    import peft
    import transformers

    from experiments.data import DialogSummaryDataModule
    from peftcore.t5 import t5_config

    clock = _Clock(warmup, device)
    data = DialogSummaryDataModule(batch_size=BATCH, max_source_length=512, max_target_length=128)
    data.setup("fit")
    train = [{"input_ids": e.input_ids, "labels": e.labels} for e in data.examples["train"]]
    torch.manual_seed(42)
    model = transformers.T5ForConditionalGeneration(t5_config(shape))
    lora = peft.LoraConfig(r=32, lora_alpha=64, lora_dropout=0.05, task_type="SEQ_2_SEQ_LM",
                           target_modules=["q", "k", "v", "o", "wi", "wo", "lm_head"])
    model = peft.get_peft_model(model, lora)
    collator = transformers.DataCollatorForSeq2Seq(data.tokenizer, model=model)
    padding: list[float] = []

    def collate(features):
        batch = collator(features)
        real = sum(len(f["input_ids"]) + len(f["labels"]) for f in features)
        padding.append(1 - real / (len(features) * (batch["input_ids"].shape[1] + batch["labels"].shape[1])))
        return batch

    logged: list[float] = []

    class Timer(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            clock.step_end()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                logged.append(round(float(logs["loss"]), 4))

        def on_train_end(self, args, state, control, **kwargs):
            clock.end()

    args = transformers.Seq2SeqTrainingArguments(
        output_dir=str(workdir / "hf"), per_device_train_batch_size=BATCH, max_steps=steps, learning_rate=1e-3,
        warmup_steps=0.06, weight_decay=0.01, max_grad_norm=1.0, lr_scheduler_type="linear",
        bf16=device.type == "cuda", use_cpu=device.type != "cuda", save_strategy="no", report_to=[],
        logging_steps=10, dataloader_num_workers=0, seed=42, disable_tqdm=True,
    )
    trainer = transformers.Seq2SeqTrainer(model=model, args=args, train_dataset=train, data_collator=collate,
                                          callbacks=[Timer()])
    trainer.train()
    return dict(samples_per_s=round(clock.samples_per_s(), 2), steps=clock.steps,
                padding_fraction=round(statistics.mean(padding), 4),
                loss_every_10_steps=logged)  # the Trainer's mean over each 10 steps


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", default="t5-base")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--warmup", type=int, default=20, help="steps left out of the timing")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    runs: dict[str, list[dict]] = {"ours": [], "reference": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.rounds):
            for name, fn in (("ours", run_ours), ("reference", run_reference)):
                workdir = Path(tmp) / f"{name}{i}"
                workdir.mkdir()
                runs[name].append(fn(args.shape, args.steps, args.warmup, device, workdir))
                print(f"round {i} {name}: {runs[name][-1]}", flush=True)
    # Round 0 warms the process up (CUDA context, cuBLAS handles, the caching allocator) for both
    # sides: with more than one round it is recorded but left out of the figures.
    counted = slice(1, None) if args.rounds > 1 else slice(None)
    ours = [r["samples_per_s"] for r in runs["ours"]][counted]
    theirs = [r["samples_per_s"] for r in runs["reference"]][counted]
    pairs = [a / b for a, b in zip(ours, theirs)]
    result = dict(benchmark="end to end: experiments fit vs Seq2SeqTrainer + peft (samples/s)", machine=machine(device),
                  settings=vars(args), runs=runs,
                  speedup=dict(median=round(statistics.median(ours) / statistics.median(theirs), 3),
                               low=round(min(pairs), 3), high=round(max(pairs), 3)))
    path = write_result("bench_end_to_end", device, result)
    print_table(("", "samples/s (median)", "padding fraction"),
                [("experiments fit", statistics.median(ours), runs["ours"][0]["padding_fraction"]),
                 ("Seq2SeqTrainer + peft", statistics.median(theirs), runs["reference"][0]["padding_fraction"])],
                f"{args.shape}, {args.steps} steps of {BATCH}, {device}: speed-up {result['speedup']}")
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()

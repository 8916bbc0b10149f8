"""End to end: training throughput of ``experiments fit`` next to the script a peft user would write.

    python -m benchmarks.bench_end_to_end [--device cuda] [--shape t5-base] [--examples 512] [--rounds 2]
                                          [--epochs 2 --compile]

Both train the study's LoRA (``experiments/configs/lora.yaml``: r=32, alpha=64, dropout 0.05 on
q,k,v,o,wi,wo,lm_head) on the same ``--examples`` TweetSumm dialogues (the first of the bundled
training split, tokenized by our data module: 512 source / 128 target tokens), for ``--epochs``
epochs, from the same randomly initialised model of ``--shape`` (the model's own dropout 0.1 on),
with batch size 8, AdamW (each side's default kernel: fused in both), the same learning rate,
warm-up, weight decay and gradient clipping, and the same precision (bf16 autocast on CUDA, fp32
on CPU).

* ours: ``python -m experiments fit --config experiments/configs/lora.yaml`` with the model built
  from the shape instead of the hub (run through the same CLI function, in a scratch directory);
* the reference: transformers ``Seq2SeqTrainer`` + peft ``get_peft_model``, with
  ``DataCollatorForSeq2Seq`` and the Trainer's default random batches.

The clock runs over the last epoch, from the start of its first step to the end of training, so
both sides are timed on exactly the same examples; samples per second is the number of examples
over that time. Set-up, data loading before the first step, and (with ``--epochs 2``) compilation
and the first pass stay out. ``--compile`` compiles both (``model.compile: true``; the Trainer's
``torch_compile``). One training step of the model warms the process up first; then the runs
alternate, the order swapped each round (ours, theirs; theirs, ours; ...). The ratio is ours /
reference of samples per second (above 1: ours is faster), with its range over the rounds. Each
side's padding fraction (over all its batches) is reported: fewer padded tokens is part of what
ours does differently. Ours also writes its checkpoint at the end of the epoch (the reference is
told to save nothing), inside the timed span.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks import common
from benchmarks.common import machine, print_table, synchronize, write_result

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "experiments" / "configs" / "lora.yaml"
BATCH = 8
LORA_TARGETS = ["q", "k", "v", "o", "wi", "wo", "lm_head"]  # lora.yaml's


class _Clock:
    """Wall time from the start of step ``start_step`` (counted from 0) to the end of training."""

    def __init__(self, start_step: int, device: torch.device) -> None:
        self.start_step, self.device = start_step, device
        self.started = self.ended = None
        self.padding: list[float] = []
        self.losses: list[float] = []

    def step_begins(self, step: int) -> None:
        if step == self.start_step:
            synchronize(self.device)
            self.started = time.perf_counter()

    def timing(self) -> bool:
        return self.started is not None

    def end(self) -> None:
        synchronize(self.device)
        self.ended = time.perf_counter()

    def result(self, examples: int) -> dict:
        return dict(
            samples_per_s=round(examples / (self.ended - self.started), 3),
            seconds=round(self.ended - self.started, 2),
            padding_fraction=round(statistics.mean(self.padding), 4),
            mean_loss=round(statistics.mean(self.losses), 4),
        )


def run_ours(args, device: torch.device, workdir: Path) -> dict:
    from lightning.pytorch.callbacks import Callback

    from experiments.cli import lightning_cli

    clock = _Clock(timed_from(args), device)

    class Timer(Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            clock.step_begins(trainer.global_step)

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            clock.padding.append(float(batch["padding_fraction"]))
            if clock.timing():
                clock.losses.append(
                    outputs["loss"].detach()
                )  # read after training: no synchronisation per step

        def on_train_end(self, trainer, module):
            clock.end()

    precision = "bf16-mixed" if device.type == "cuda" else "32-true"
    cwd = os.getcwd()
    os.chdir(workdir)  # the config's checkpoints and logs land in the scratch directory
    try:
        cli = lightning_cli(
            [
                "--config",
                str(CONFIG),
                "--model.pretrained=null",
                f"--model.shape={args.shape}",
                "--model.random_init=true",
                f"--model.compile={str(args.compile).lower()}",
                f"--trainer.max_epochs={args.epochs}",
                "--trainer.limit_val_batches=0",
                "--trainer.num_sanity_val_steps=0",
                f"--trainer.accelerator={device.type}",
                f"--trainer.precision={precision}",
                f"--data.batch_size={BATCH}",
                f"--data.limit_train={args.examples}",
            ],
            run=False,
        )
        cli.trainer.callbacks.append(Timer())
        cli.trainer.fit(cli.model, cli.datamodule)
    finally:
        os.chdir(cwd)
    clock.losses = [float(loss) for loss in clock.losses]
    return clock.result(args.examples)


def run_reference(args, device: torch.device, workdir: Path) -> dict:
    import peft
    import transformers

    from experiments.data import DialogSummaryDataModule
    from peftcore.t5 import t5_config

    clock = _Clock(timed_from(args), device)
    data = DialogSummaryDataModule(  # the same examples as the CLI gives ours: T5's prefix, the T5 tokenizer
        batch_size=BATCH,
        max_source_length=512,
        max_target_length=128,
        limit_train=args.examples,
        prefix="summarize: ",
        tokenizer="bundled",
    )
    data.setup("fit")
    train = [{"input_ids": e.input_ids, "labels": e.labels} for e in data.examples["train"]]
    torch.manual_seed(42)
    model = transformers.T5ForConditionalGeneration(t5_config(args.shape))
    lora = peft.LoraConfig(
        r=32, lora_alpha=64, lora_dropout=0.05, task_type="SEQ_2_SEQ_LM", target_modules=LORA_TARGETS
    )
    model = peft.get_peft_model(model, lora)
    collator = transformers.DataCollatorForSeq2Seq(data.tokenizer, model=model)

    def collate(features):
        batch = collator(features)
        real = sum(len(f["input_ids"]) + len(f["labels"]) for f in features)
        clock.padding.append(
            1 - real / (len(features) * (batch["input_ids"].shape[1] + batch["labels"].shape[1]))
        )
        return batch

    class Timer(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            clock.step_begins(state.global_step)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if clock.timing() and logs and "loss" in logs:
                clock.losses.append(float(logs["loss"]))

        def on_train_end(self, args, state, control, **kwargs):
            clock.end()

    training = transformers.Seq2SeqTrainingArguments(
        output_dir=str(workdir / "hf"),
        per_device_train_batch_size=BATCH,
        num_train_epochs=args.epochs,
        learning_rate=1e-3,
        warmup_steps=0.06,
        weight_decay=0.01,
        max_grad_norm=1.0,
        lr_scheduler_type="linear",
        bf16=device.type == "cuda",
        use_cpu=device.type != "cuda",
        save_strategy="no",
        report_to=[],
        logging_steps=1,
        dataloader_num_workers=0,
        seed=42,
        disable_tqdm=True,
        torch_compile=args.compile,
    )
    trainer = transformers.Seq2SeqTrainer(
        model=model, args=training, train_dataset=train, data_collator=collate, callbacks=[Timer()]
    )
    trainer.train()
    return clock.result(args.examples)


def timed_from(args) -> int:
    """The first step of the last epoch."""
    return (args.epochs - 1) * -(-args.examples // BATCH)


def warm_up(shape: str, device: torch.device) -> None:
    """One training step of the shape, so that the first run does not pay the process's start-up
    (thread pools, the CUDA context and kernels' first loads) alone."""
    from benchmarks.bench_train_step import build_base, make_batch

    build_base(shape, device)(**make_batch(BATCH, 128, 32, device)).loss.backward()
    synchronize(device)


def main(argv: list[str] | None = None) -> dict:
    parser = common.parser(__doc__)
    parser.add_argument("--shape", default="t5-base")
    parser.add_argument(
        "--examples", type=int, default=512, help="training examples per epoch (the first of the split)"
    )
    parser.add_argument("--epochs", type=int, default=1, help="the last one is timed")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="compile both sides (use --epochs 2)")
    args, device = common.parse(parser, argv)
    if args.compile and args.epochs < 2:
        parser.error("--compile needs --epochs 2 or more: the timed epoch must not hold the compilation")
    warm_up(args.shape, device)
    runs: dict[str, list[dict]] = {"ours": [], "reference": []}
    sides = [("ours", run_ours), ("reference", run_reference)]
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.rounds):
            for name, fn in sides if i % 2 == 0 else sides[::-1]:
                workdir = Path(tmp) / f"{name}{i}"
                workdir.mkdir()
                runs[name].append(fn(args, device, workdir))
                print(f"round {i} {name}: {runs[name][-1]}", flush=True)
    ours = [r["samples_per_s"] for r in runs["ours"]]
    theirs = [r["samples_per_s"] for r in runs["reference"]]
    pairs = [a / b for a, b in zip(ours, theirs)]
    result = dict(
        benchmark="end to end: experiments fit vs Seq2SeqTrainer + peft (samples/s)",
        machine=machine(device),
        settings=vars(args),
        runs=runs,
        speedup=dict(
            median=round(statistics.median(ours) / statistics.median(theirs), 3),
            low=round(min(pairs), 3),
            high=round(max(pairs), 3),
        ),
    )
    path = write_result("bench_end_to_end" + ("_compiled" if args.compile else ""), device, result)
    print_table(
        ("", "samples/s (median)", "padding fraction"),
        [
            ("experiments fit", statistics.median(ours), runs["ours"][0]["padding_fraction"]),
            ("Seq2SeqTrainer + peft", statistics.median(theirs), runs["reference"][0]["padding_fraction"]),
        ],
        f"{args.shape}, {args.examples} examples x {args.epochs} epochs, batch {BATCH}, {device}: "
        f"speed-up {result['speedup']}",
    )
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()

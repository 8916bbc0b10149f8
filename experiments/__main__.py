"""``python -m experiments {fit,validate,test,predict} --config experiments/configs/lora.yaml``

LightningCLI builds Seq2SeqFineTuner (``model:``), DialogSummaryDataModule (``data:``) and the
Trainer (``trainer:``) from the YAML and the command line; ``--help`` documents every option from
the classes' docstrings. ``evaluate`` and ``report`` are this project's own subcommands.
"""

from __future__ import annotations

import sys

from jsonargparse import lazy_instance
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger

from experiments.data import DialogSummaryDataModule
from experiments.module import Seq2SeqFineTuner

# The TensorBoard logger by default; configs add checkpointing and the rich progress bar.
TRAINER_DEFAULTS = {"logger": lazy_instance(TensorBoardLogger, save_dir="runs")}


def lightning_cli(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    return LightningCLI(
        Seq2SeqFineTuner,
        DialogSummaryDataModule,
        seed_everything_default=0,
        trainer_defaults=TRAINER_DEFAULTS,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("evaluate", "report"):
        from experiments.evaluate import evaluate_cli, report_cli

        (evaluate_cli if argv[0] == "evaluate" else report_cli)(argv[1:])
        return
    lightning_cli(argv)


if __name__ == "__main__":
    main()

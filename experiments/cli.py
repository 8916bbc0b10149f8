"""The project's LightningCLI, built here and imported by whoever needs one.

``python -m experiments {fit,validate,test,predict} --config experiments/configs/lora.yaml``
builds Seq2SeqFineTuner (``model:``), DialogSummaryDataModule (``data:``) and the Trainer
(``trainer:``) from the YAML and the command line. On top of Lightning's CLI:

- A run owns a directory, ``<save_dir>/<name>/version_N/``: its TensorBoard events, the config
  of every command run on it (``config.yaml``, then ``config.<command>-<k>.yaml``: nothing is
  overwritten), its checkpoints (``checkpoints/``, written by RunCheckpoint) and
  ``best_adapter/``. ``--ckpt_path`` of a run continues in that run's directory: ``fit``
  resumes it, ``test``/``validate``/``predict`` log and write their predictions there.
  ``--ckpt_path last`` (or ``best``) is the newest run's ``last.ckpt`` (``best.ckpt``).
- The method section ``model.peft`` is typed with the config classes: a typo names the key,
  the valid ones and, for peft's names, the peftcore one; a bad value shows the config's own
  message; ``fit --model.peft.help LoRAConfig`` lists a method's fields.
- One way to choose the optimizer: ``model.optimizer`` (with ``model.lr``, ``weight_decay``,
  ``betas``, ``warmup_ratio``). Lightning's ``--optimizer`` / ``--lr_scheduler`` are refused.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib
import os
import re
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, NoReturn, Optional

from jsonargparse import Namespace, set_parsing_settings
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from peftcore import methods

from experiments.data import DialogSummaryDataModule
from experiments.module import Seq2SeqFineTuner

TENSORBOARD = "lightning.pytorch.loggers.TensorBoardLogger"
CHECKPOINT = "experiments.checkpointing.RunCheckpoint"
# The TensorBoard logger and RunCheckpoint by default; configs name them to set their arguments.
TRAINER_DEFAULTS = {"logger": {"class_path": TENSORBOARD, "init_args": {"save_dir": "runs"}}}
NAMED_CHECKPOINTS = ("last", "best")
# The method configs are dataclasses; as "subclass" types their class_path stays in the parsed and
# saved config (config.yaml says which method ran) and --model.peft.help <class> lists the fields.
set_parsing_settings(subclasses_enabled=list(methods.config_classes()))


def lightning_cli(args: Optional[list[str]] = None, run: bool = True, exit_on_error: bool = True) -> LightningCLI:
    """The CLI over ``args`` (a command line without the program name; None: ``sys.argv``).
    ``exit_on_error=False`` raises argparse.ArgumentError instead of printing and exiting."""
    if args is not None and list(args) == sys.argv[1:]:
        args = None  # the command line itself: DDP relaunches the other ranks from sys.argv
    with _argv_is_not_the_input(args):
        return ProjectCLI(
            Seq2SeqFineTuner,
            DialogSummaryDataModule,
            seed_everything_default=0,
            trainer_defaults=TRAINER_DEFAULTS,
            save_config_callback=KeepingSaveConfigCallback,
            parser_class=ProjectParser,
            parser_kwargs={"prog": "python -m experiments", "exit_on_error": exit_on_error},
            auto_configure_optimizers=False,
            args=args,
            run=run,
        )


@contextmanager
def _argv_is_not_the_input(args: Optional[list[str]]) -> Iterator[None]:
    """LightningCLI warns when it is given ``args`` while ``sys.argv`` holds arguments too (it
    cannot tell which the user meant); when ``args`` other than the command line are given (say by
    ``evaluate``), they are the input."""
    if args is None:
        yield
        return
    saved, sys.argv = sys.argv, sys.argv[:1]
    try:
        yield
    finally:
        sys.argv = saved


class ProjectParser(LightningArgumentParser):
    """A parse error is the message alone (jsonargparse prints the whole usage, a hundred lines,
    before it); errors about ``model.peft`` say what to write instead."""

    def error(self, message: str, ex: Optional[Exception] = None) -> NoReturn:
        message = explain_method_error(message)
        if not self.exit_on_error or os.environ.get("JSONARGPARSE_DEBUG"):
            super().error(message, ex)
        command = getattr(getattr(ex, "subcommand_parser", None), "prog", self.prog).replace(" [options]", "")
        sys.stderr.write(f"error: {message}\n(`{command} --help` lists every option)\n")
        raise SystemExit(2)


class ProjectCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        for name in ("optimizer", "lr_scheduler"):
            parser.add_argument(f"--{name}", type=_refuse_lightning_optimizer(name), help="refused: see --model.optimizer")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        _check_method(self.parser, config)
        _run_directory(config)
        _default_checkpointing(self.parser, config)

    def instantiate_classes(self) -> None:
        # The model and data classes check their settings and raise ValueError naming the bad one
        # (a target that matches no module, a missing data file...): an error, not a traceback.
        try:
            super().instantiate_classes()
        except (ValueError, FileNotFoundError) as err:
            self.parser.error(str(err))


# --- the method section ------------------------------------------------------------------------


def _check_method(parser: LightningArgumentParser, config: Namespace) -> None:
    """Build model.peft's config once here, so that a bad value shows the config's own message as
    a CLI error (jsonargparse would raise it in a traceback, once for each config class it tried).
    After parsing, the section holds the fields of one config class."""
    spec = config.get("model", Namespace()).get("peft")
    if not isinstance(spec, Namespace):
        return
    fields = dict(spec.get("init_args") or spec) if spec.get("class_path") else dict(spec)
    for cls in methods.config_classes():
        if set(fields) == {f.name for f in dataclasses.fields(cls)}:
            try:
                cls(**fields)
            except (TypeError, ValueError) as err:
                parser.error(f'Parser key "model.peft": {err}')
            return


def config_class(class_path: str) -> type:
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module or "peftcore"), name)


def explain_method_error(message: str) -> str:
    """jsonargparse's error for an unknown key under model.peft, said plainly: the key, the
    config's fields and, for a peft name, the peftcore field to use."""
    if '"model.peft"' not in message:
        return message
    unknown = re.search(r"Problem with given class_path '([\w.]+)':\s*module '[\w.]+' has no attribute", message)
    if unknown:
        known = ", ".join(f"peftcore.{cls.__name__}" for cls in methods.config_classes())
        return f'Parser key "model.peft": {unknown.group(1)!r} is not a method config; the methods are {known}'
    bad = re.search(r"Problem with given class_path '([\w.]+)':\s*Option '(\w+)' is not accepted", message)
    if bad is None:
        return message
    cls = config_class(bad.group(1))
    key, fields = bad.group(2), [f.name for f in dataclasses.fields(cls)]
    renamed = dict(getattr(methods.for_config_class(cls), "PEFT_NAMES", {}))  # peft's name -> peftcore's
    close = difflib.get_close_matches(key, [*fields, *renamed], n=1)
    if key in renamed:
        hint = f"; peft's {key!r} is peftcore's {renamed[key]!r}"
    elif close and close[0] in renamed:
        hint = f"; peft's {close[0]!r} (did you mean it?) is peftcore's {renamed[close[0]]!r}"
    elif close:
        hint = f"; did you mean {close[0]!r}"
    else:
        hint = ""
    return (
        f'Parser key "model.peft": {cls.__name__} has no field {key!r}{hint}. Its fields: {", ".join(fields)} '
        f"(fit --model.peft.help {cls.__name__} describes them)"
    )


def _refuse_lightning_optimizer(name: str):
    def refuse(value: object) -> NoReturn:
        raise argparse.ArgumentTypeError(
            f"Lightning's --{name} is not used here: it would replace the project's AdamW with its weight-decay "
            "groups and warm-up. Choose with --model.optimizer (adamw | paged_adamw), --model.lr, "
            "--model.weight_decay, --model.betas and --model.warmup_ratio"
        )

    refuse.__name__ = f"refused_{name}"
    return refuse


# --- where a run's files go --------------------------------------------------------------------


def _run_directory(config: Namespace) -> None:
    """``--ckpt_path`` of a run continues in that run's version directory; ``last``/``best``
    name the newest run's checkpoint."""
    ckpt = config.get("ckpt_path")
    root = runs_of(config)
    if not ckpt or root is None:
        return
    if ckpt in NAMED_CHECKPOINTS:
        ckpt = config.ckpt_path = str(newest_checkpoint(root, ckpt))
    path = Path(ckpt)
    if path.parent.name == "checkpoints" and path.parent.parent.parent.resolve() == root.resolve():
        config.trainer.logger.init_args.version = path.parent.parent.name


def runs_of(config: Namespace) -> Optional[Path]:
    """``<save_dir>/<name>``, where the TensorBoard logger of ``config`` puts its runs (None
    without one)."""
    logger = config.get("trainer", Namespace()).get("logger")
    if not isinstance(logger, Namespace) or logger.get("class_path") != TENSORBOARD:
        return None
    init = logger.init_args
    return Path(init.get("save_dir") or ".") / (init.get("name") or "lightning_logs")


def newest_checkpoint(run_root: Path, which: str) -> Path:
    """``<run_root>/version_*/checkpoints/<which>.ckpt``, the most recently written."""
    found = sorted(run_root.glob(f"*/checkpoints/{which}.ckpt"), key=os.path.getmtime)
    if not found:
        raise FileNotFoundError(
            f"--ckpt_path {which}: no run under {run_root} has checkpoints/{which}.ckpt; give the checkpoint's path"
        )
    return found[-1]


def _default_checkpointing(parser: LightningArgumentParser, config: Namespace) -> None:
    """RunCheckpoint unless the config names a checkpoint callback (or turns checkpointing off);
    Lightning's own ModelCheckpoint is refused: it overwrites and loses work (see RunCheckpoint)."""
    trainer = config.get("trainer")
    if trainer is None or trainer.get("enable_checkpointing") is False:
        return
    callbacks = trainer.get("callbacks") or []
    names = [c.get("class_path") for c in callbacks if isinstance(c, Namespace)]
    if "lightning.pytorch.callbacks.ModelCheckpoint" in names:
        parser.error(
            "trainer.callbacks names lightning.pytorch.callbacks.ModelCheckpoint; use "
            f"{CHECKPOINT} (the same arguments, plus save_every_n_steps): it keeps every run's checkpoints in the "
            "run's own directory, writes them atomically and saves on Ctrl-C and on errors"
        )
    if CHECKPOINT not in names:
        trainer.callbacks = [*callbacks, Namespace(class_path=CHECKPOINT, init_args=Namespace())]


class KeepingSaveConfigCallback(SaveConfigCallback):
    """Saves each command's config in the run's directory without overwriting: ``config.yaml``
    for the command that made the run, then ``config.<command>-<k>.yaml``."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        log_dir = trainer.log_dir if self.save_to_log_dir and not trainer.fast_dev_run else None
        if log_dir is not None and (Path(log_dir) / self.config_filename).exists():
            command, k = getattr(stage, "value", stage), 1  # the stage is an enum: its value says "predict"
            while (Path(log_dir) / f"config.{command}-{k}.yaml").exists():
                k += 1
            self.config_filename = f"config.{command}-{k}.yaml"
        if trainer.fast_dev_run:
            return
        super().setup(trainer, pl_module, stage)


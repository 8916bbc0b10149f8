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
- One way to choose the optimizer: the section ``model.optimizer`` (``name``, ``lr``,
  ``weight_decay``, ``betas``, ``warmup_ratio``, ...). Lightning's ``--optimizer`` / ``--lr_scheduler`` are refused.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib
import os
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import torch
from jsonargparse import Namespace, set_parsing_settings
from lightning.pytorch.callbacks import Checkpoint, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info

from experiments.checkpointing import LAST, read_checkpoint
from experiments.data import DialogSummaryDataModule
from experiments.model import summarisation_defaults
from experiments.module import Seq2SeqFineTuner
from experiments.settings import GenerationSettings, OptimizerSettings
from peftcore import methods
from peftcore.peft_format import peft_names

TENSORBOARD = "lightning.pytorch.loggers.TensorBoardLogger"
CHECKPOINT = "experiments.checkpointing.RunCheckpoint"
# The TensorBoard logger and RunCheckpoint by default; configs name them to set their arguments.
TRAINER_DEFAULTS = {"logger": {"class_path": TENSORBOARD, "init_args": {"save_dir": "runs"}}}
NAMED_CHECKPOINTS = ("last", "best")
# The method configs are dataclasses; as "subclass" types their class_path stays in the parsed and
# saved config (config.yaml says which method ran) and --model.peft.help <class> lists the fields.
set_parsing_settings(subclasses_enabled=list(methods.config_classes()))


@dataclasses.dataclass(frozen=True)
class RunPlace:
    """Where a run a command starts for a sweep or a study goes: the TensorBoard logger's
    ``save_dir/name/version``, and the W&B run's group (the sweep) and name."""

    save_dir: str
    name: str
    version: str
    group: str | None = None


def lightning_cli(
    args: list[str] | None = None, run: bool = True, exit_on_error: bool = True, place: RunPlace | None = None
) -> LightningCLI:
    """The CLI over ``args`` (a command line without the program name; None: ``sys.argv``).
    ``exit_on_error=False`` raises argparse.ArgumentError instead of printing and exiting;
    ``place`` puts the run where a sweep or study keeps it, whatever loggers the config lists."""
    if args is not None and list(args) == sys.argv[1:]:
        args = None  # the command line itself: DDP relaunches the other ranks from sys.argv
    with _argv_is_not_the_input(args):
        return ProjectCLI(
            Seq2SeqFineTuner,
            DialogSummaryDataModule,
            place=place,
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
def _argv_is_not_the_input(args: list[str] | None) -> Iterator[None]:
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

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        message = explain_moved_option(explain_method_error(message))
        if not self.exit_on_error or os.environ.get("JSONARGPARSE_DEBUG"):
            super().error(message, ex)
        command = getattr(getattr(ex, "subcommand_parser", None), "prog", self.prog).replace(" [options]", "")
        sys.stderr.write(f"error: {message}\n(`{command} --help` lists every option)\n")
        raise SystemExit(2)


class ProjectCLI(LightningCLI):
    def __init__(self, *args: Any, place: RunPlace | None = None, **kwargs: Any) -> None:
        self.place = place
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        for name in ("optimizer", "lr_scheduler"):
            parser.add_argument(
                f"--{name}", type=_refuse_lightning_optimizer(name), help="refused: see --model.optimizer"
            )

    def _parse_ckpt_path(self) -> None:
        """Lightning's version of this hook loads the checkpoint's hyperparameters over the parsed
        config, so ``--ckpt_path FILE`` silently undid ``--model.generation.num_beams 4`` (and it shows a
        damaged file as a raw traceback); LightningCLI offers no public switch for it. Here what
        the command gives wins; the base and the method, which a trained checkpoint cannot
        change, are checked against the checkpoint and refused by name when they differ."""
        config = self.config[self.config.subcommand] if self.config.get("subcommand") else None
        if config is None or not config.get("ckpt_path"):
            return
        try:
            checkpoint = read_checkpoint(_resolve_checkpoint(config))
        except (ValueError, FileNotFoundError) as err:
            self.parser.error(str(err))
        adopted = same_model(
            config.model, checkpoint.get("hyper_parameters") or {}, config.ckpt_path, self.parser.error
        )
        if adopted:
            self.config = self.parser.parse_object({self.config.subcommand: {"model": adopted}}, self.config)
            rank_zero_info(
                f"model.{', model.'.join(adopted)} from {config.ckpt_path} (the command names no model)"
            )

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        _check_method(self.parser, config)
        _data_from_model(self.parser, config)
        _tensorboard_first(config)
        if self.place is not None:
            _place_run(self.parser, config, self.place)
        _run_directory(config)
        _default_callbacks(self.parser, config)
        _sharding_strategy(self.parser, config)

    def instantiate_classes(self) -> None:
        # The model and data classes check their settings and raise ValueError naming the bad one
        # (a target that matches no module, a missing data file...): an error, not a traceback.
        try:
            super().instantiate_classes()
        except (ValueError, FileNotFoundError) as err:
            self.parser.error(str(err))

    # Each command reads and checks its data before Lightning makes the run's directory, so a
    # bad file or row is an error that leaves nothing behind (setup() then finds it done).
    def before_fit(self) -> None:
        self._read_data("fit")
        rank_zero_info(f"fit: run directory {self.trainer.log_dir}")

    def after_fit(self) -> None:
        if self.trainer.fast_dev_run:
            return
        saved = [str(Path(c.dirpath) / LAST) for c in self.trainer.checkpoint_callbacks if c.dirpath]
        rank_zero_info(
            f"fit: done, run directory {self.trainer.log_dir}"
            + (f"; resume or extend it with --ckpt_path {saved[0]}" if saved else "")
        )

    def before_validate(self) -> None:
        self._read_data("validate")

    def before_test(self) -> None:
        self._read_data("test")

    def before_predict(self) -> None:
        self._read_data("predict")

    def _read_data(self, stage: str) -> None:
        if self.datamodule is None or self.trainer.world_size > 1:  # other ranks read in Lightning's setup
            return
        try:
            self.datamodule.prepare_data()
            self.datamodule.setup(stage)
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


def _data_from_model(parser: LightningArgumentParser, config: Namespace) -> None:
    """The data settings a config leaves to the model (``prefix``, ``tokenizer``: null), set from
    the model's settings; a model the summarisation CLI cannot train is refused here by name."""
    data, model = config.get("data"), config.get("model")
    if (
        data is None
        or model is None
        or (data.get("prefix") is not None and data.get("tokenizer") is not None)
    ):
        return
    try:
        defaults = summarisation_defaults(model.get("pretrained"), model.get("shape"))
    except (ValueError, OSError) as err:
        parser.error(str(err))
    for key, value in defaults.items():
        if data.get(key) is None:
            data[key] = value


# Options that moved into the model's groups: the flat name -> where it is now.
MOVED_OPTIONS = {
    **{name: f"optimizer.{name}" for name in (f.name for f in dataclasses.fields(OptimizerSettings))},
    **{name: f"generation.{name}" for name in (f.name for f in dataclasses.fields(GenerationSettings))},
}


def explain_moved_option(message: str) -> str:
    """An unknown flat ``model.lr`` (or ``model.num_beams``...), or a string given for the
    ``model.optimizer`` section: the message says where the option is now."""
    flat = re.search(r"model\.(\w+)", message) if re.search(r"unrecognized|not accept", message) else None
    if flat and flat.group(1) in MOVED_OPTIONS and flat.group(1) != "name":
        moved = MOVED_OPTIONS[flat.group(1)]
        return (
            f"model.{flat.group(1)} is now model.{moved} (the optimizer and generation options have their "
            f"own sections: model: {{{moved.split('.')[0]}: {{{flat.group(1)}: ...}}}}, or --model.{moved})"
        )
    if '"model.optimizer"' in message and "Unable to load config" in message:
        return (
            "model.optimizer is a section now: give the optimizer's name as model.optimizer.name "
            "(--model.optimizer.name paged_adamw, or model: {optimizer: {name: paged_adamw}})"
        )
    return message


def explain_method_error(message: str) -> str:
    """jsonargparse's error for an unknown key under model.peft, said plainly: the key, the
    config's fields and, for a peft name, the peftcore field to use."""
    if '"model.peft"' not in message:
        return message
    unknown = re.search(
        r"Problem with given class_path '([\w.]+)':\s*module '[\w.]+' has no attribute", message
    )
    if unknown:
        known = ", ".join(f"peftcore.{cls.__name__}" for cls in methods.config_classes())
        return (
            f'Parser key "model.peft": {unknown.group(1)!r} is not a method config; the methods are {known}'
        )
    bad = re.search(r"Problem with given class_path '([\w.]+)':\s*Option '(\w+)' is not accepted", message)
    if bad is None:
        return message
    cls = config_class(bad.group(1))
    key, fields = bad.group(2), [f.name for f in dataclasses.fields(cls)]
    renamed = peft_names(cls)  # peft's name -> peftcore's
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
            "groups and warm-up. Choose with --model.optimizer.name (adamw | paged_adamw), --model.optimizer.lr, "
            "--model.optimizer.weight_decay, --model.optimizer.betas and --model.optimizer.warmup_ratio"
        )

    refuse.__name__ = f"refused_{name}"
    return refuse


# --- where a run's files go --------------------------------------------------------------------


def _resolve_checkpoint(config: Namespace) -> str:
    """``config.ckpt_path``, with ``last``/``best`` made the newest run's file (set in ``config``)."""
    if config.ckpt_path in NAMED_CHECKPOINTS:
        root = runs_of(config)
        if root is None:
            raise ValueError(
                f"--ckpt_path {config.ckpt_path} needs the TensorBoard logger to find the runs; "
                "give the checkpoint's path"
            )
        config.ckpt_path = str(newest_checkpoint(root, config.ckpt_path))
    return config.ckpt_path


def _run_directory(config: Namespace) -> None:
    """``--ckpt_path`` of a run continues in that run's version directory."""
    ckpt, root = config.get("ckpt_path"), runs_of(config)
    if not ckpt or root is None:
        return
    path = Path(ckpt)
    if path.parent.name == "checkpoints" and path.parent.parent.parent.resolve() == root.resolve():
        _tensorboard(config).init_args.version = path.parent.parent.name


MODEL_PARALLEL = f"{ModelParallelStrategy.__module__}.{ModelParallelStrategy.__qualname__}"


def _sharding_strategy(parser: LightningArgumentParser, config: Namespace) -> None:
    """``--trainer.strategy fsdp2``: Lightning's ModelParallelStrategy as FSDP2 alone, sharding
    across every device (``data_parallel_size`` = devices x nodes, ``tensor_parallel_size`` 1),
    with whole-tensor checkpoints (``save_distributed_checkpoint: false``); the module shards the
    model in ``configure_model``. A ModelParallelStrategy given by class is checked for the same."""
    trainer = config.get("trainer")
    strategy = trainer.get("strategy") if trainer is not None else None
    fsdp1 = strategy in FSDPStrategy.get_registered_strategies() or (
        isinstance(strategy, Namespace) and _is_subclass(_class_path(strategy), FSDPStrategy)
    )
    if fsdp1 and config.get("model", Namespace()).get("quantization") is not None:
        parser.error(
            "trainer.strategy fsdp (FSDP1) cannot shard a 4-bit base (model.quantization): it flattens each unit's "
            "parameters into one tensor of one dtype, and the packed weights are uint8. Use --trainer.strategy fsdp2, "
            "which shards the 4-bit base across the ranks, or ddp"
        )
    if fsdp1 and not _on_cuda(trainer):
        parser.error(
            f"trainer.strategy {strategy if isinstance(strategy, str) else _class_path(strategy)} is FSDP1, which "
            "Lightning runs on CUDA devices only (on the CPU it would save empty adapter shards). On the CPU use "
            "--trainer.strategy fsdp2 (FSDP2, exact on gloo) or ddp"
        )
    if (
        fsdp1
        and isinstance(strategy, Namespace)
        and (strategy.get("init_args") or {}).get("state_dict_type") == "sharded"
    ):
        parser.error(
            "trainer.strategy FSDPStrategy with state_dict_type: sharded writes each rank's shard; peftcore's "
            "checkpoints hold whole tensors: leave state_dict_type at full"
        )
    if strategy == "fsdp2":
        devices = _device_count(trainer.get("devices"), trainer.get("accelerator"))
        trainer.strategy = Namespace(
            class_path=MODEL_PARALLEL,
            init_args=Namespace(
                data_parallel_size=devices * int(trainer.get("num_nodes") or 1),
                tensor_parallel_size=1,
                save_distributed_checkpoint=False,
            ),
        )
        return
    if isinstance(strategy, Namespace) and _is_subclass(_class_path(strategy), ModelParallelStrategy):
        init = strategy.get("init_args") or Namespace()
        if (
            init.get("tensor_parallel_size") != 1
            or init.get("save_distributed_checkpoint", True) is not False
        ):
            parser.error(
                f"trainer.strategy {_class_path(strategy)} needs tensor_parallel_size: 1 (peftcore shards "
                "data-parallel only) and save_distributed_checkpoint: false (checkpoints hold whole tensors); given "
                f"tensor_parallel_size={init.get('tensor_parallel_size')!r}, save_distributed_checkpoint="
                f"{init.get('save_distributed_checkpoint', True)!r}. --trainer.strategy fsdp2 sets all of it"
            )


def _on_cuda(trainer: Namespace) -> bool:
    accelerator = trainer.get("accelerator")
    return accelerator in ("cuda", "gpu") or (accelerator in (None, "auto") and torch.cuda.is_available())


def _device_count(devices: object, accelerator: object) -> int:
    """How many devices ``--trainer.devices`` asks for (an int, a list of indices, "auto" or -1)."""
    if isinstance(devices, (list, tuple)):
        return len(devices)
    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        devices = int(devices)
    if isinstance(devices, int) and devices > 0:
        return devices
    if accelerator == "cpu" or (accelerator in (None, "auto") and not torch.cuda.is_available()):
        return 1  # Lightning's CPU accelerator counts one device for "auto"
    return torch.cuda.device_count()


# The settings a trained checkpoint fixes: its tensors belong to this base and this method.
MODEL_IDENTITY = ("pretrained", "shape", "random_init", "gated", "peft", "quantization")


def same_model(given: Namespace, saved: dict, ckpt_path: str, error: Callable[[str], NoReturn]) -> dict:
    """Check the command's model settings against the checkpoint's hyperparameters ``saved``.
    Returns the identity settings to take from the checkpoint when the command names no model
    at all (neither pretrained nor shape); calls ``error`` when one differs from it."""
    recorded = {key: saved[key] for key in MODEL_IDENTITY if key in saved}
    if not given.get("pretrained") and not given.get("shape"):
        return recorded
    differ = [key for key in recorded if _comparable(given.get(key)) != _comparable(recorded[key])]
    if differ:
        lines = "; ".join(_difference(key, recorded[key], given.get(key)) for key in differ)
        error(
            f"--ckpt_path {ckpt_path} was trained with another model: {lines}. A checkpoint's base model and "
            "method cannot change: give the run's own config (config.yaml in its directory) or drop those options"
        )
    return {}


def _difference(key: str, saved: object, given: object) -> str:
    """``model.peft: LoRAConfig r=16 in the checkpoint, r=8 here`` (a method: the fields that differ)."""
    saved, given = _comparable(saved), _comparable(given)
    if isinstance(saved, tuple) and isinstance(given, tuple) and saved[0] == given[0]:
        fields = [k for k in saved[1] if saved[1][k] != given[1].get(k)]
        return (
            f"model.{key}: {_named(saved)} {', '.join(f'{k}={saved[1][k]!r}' for k in fields)} in the "
            f"checkpoint, {', '.join(f'{k}={given[1][k]!r}' for k in fields)} here"
        )
    return f"model.{key}: {_named(saved)} in the checkpoint, {_named(given)} here"


def _named(value: object) -> str:
    """A method as its class name (``_comparable`` makes it ``(class_path, fields)``), else the value."""
    return value[0].rpartition(".")[2] if isinstance(value, tuple) else repr(value)


def _comparable(value: object) -> object:
    """A setting as plain data: a method's section becomes its config class's full field list
    (defaults filled in, as the class normalises them), so equal settings compare equal."""
    if isinstance(value, Namespace):
        value = value.as_dict()
    if isinstance(value, dict) and value.get("class_path"):
        try:
            return (
                value["class_path"],
                dataclasses.asdict(config_class(value["class_path"])(**(value.get("init_args") or {}))),
            )
        except (TypeError, ValueError, AttributeError, ImportError):
            return value
    if isinstance(value, dict):
        return {k: _comparable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_comparable(v) for v in value]
    return str(value) if not isinstance(value, (type(None), bool, int, float, str)) else value


def loggers_of(config: Namespace) -> list[Namespace]:
    """The config's loggers: ``trainer.logger`` is one or a list (W&B beside TensorBoard)."""
    logger = config.get("trainer", Namespace()).get("logger")
    listed = logger if isinstance(logger, list) else [logger]
    return [entry for entry in listed if isinstance(entry, Namespace)]


def _tensorboard(config: Namespace) -> Namespace | None:
    """The config's TensorBoard logger (by any import path, or a subclass)."""
    return next(
        (entry for entry in loggers_of(config) if _is_subclass(entry.get("class_path"), TensorBoardLogger)),
        None,
    )


def _tensorboard_first(config: Namespace) -> None:
    """With several loggers, TensorBoard's first: Lightning takes the run's directory
    (``trainer.log_dir``) from the first, and the run's checkpoints and files live there."""
    logger = config.get("trainer", Namespace()).get("logger")
    tensorboard = _tensorboard(config)
    if isinstance(logger, list) and tensorboard is not None and logger[0] is not tensorboard:
        config.trainer.logger = [tensorboard, *(entry for entry in logger if entry is not tensorboard)]


def _place_run(parser: LightningArgumentParser, config: Namespace, place: RunPlace) -> None:
    tensorboard = _tensorboard(config)
    if tensorboard is None:
        parser.error(
            "a sweep or study keeps each run in the TensorBoard logger's directory: list a TensorBoardLogger"
        )
    tensorboard.init_args.save_dir, tensorboard.init_args.name = place.save_dir, place.name
    tensorboard.init_args.version = place.version
    for entry in loggers_of(config):
        if _is_subclass(entry.get("class_path"), WandbLogger):  # one W&B run a trial, a sweep's in one group
            entry.init_args.name = f"{place.name}/{place.version}"
            entry.init_args.group = entry.init_args.get("group") or place.group


def finish_external_runs(trainer) -> None:
    """End the W&B run of a fit that shares its process with others (a sweep's trials, a study's
    fits): W&B keeps one run per process open and the next logger would write into it."""
    if any(isinstance(logger, WandbLogger) for logger in trainer.loggers):
        import wandb  # there is a WandbLogger, so there is wandb

        if wandb.run is not None:
            wandb.finish()


def runs_of(config: Namespace) -> Path | None:
    """``<save_dir>/<name>``, where the TensorBoard logger of ``config`` puts its runs (None
    without one)."""
    logger = _tensorboard(config)
    if logger is None:
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


def _default_callbacks(parser: LightningArgumentParser, config: Namespace) -> None:
    """RunCheckpoint unless the config names a checkpoint callback; Lightning's own
    ModelCheckpoint is refused: it overwrites and loses work (see RunCheckpoint). The trainer's
    switches win over the config's callbacks: ``enable_checkpointing: false`` drops the
    checkpoint callbacks and ``enable_progress_bar: false`` the progress bars (Lightning would
    refuse the pair)."""
    trainer = config.get("trainer")
    if trainer is None:
        return
    callbacks = list(trainer.get("callbacks") or [])
    switched_off = {
        flag: base
        for flag, base in (("enable_checkpointing", Checkpoint), ("enable_progress_bar", ProgressBar))
        if trainer.get(flag) is False
    }
    kept = [
        c for c in callbacks if not any(_is_subclass(_class_path(c), base) for base in switched_off.values())
    ]
    if len(kept) < len(callbacks):
        dropped = ", ".join(_class_path(c) for c in callbacks if c not in kept)
        rank_zero_info(
            f"{' and '.join(f'trainer.{flag}=false' for flag in switched_off)}: not using {dropped}"
        )
    trainer.callbacks = kept
    if "enable_checkpointing" in switched_off:
        rank_zero_info("checkpointing is off: this run writes no checkpoint, so it cannot be resumed")
        return
    names = [_class_path(c) for c in kept]
    if "lightning.pytorch.callbacks.ModelCheckpoint" in names:
        parser.error(
            "trainer.callbacks names lightning.pytorch.callbacks.ModelCheckpoint; use "
            f"{CHECKPOINT} (the same arguments, plus save_every_n_steps): it keeps every run's checkpoints in the "
            "run's own directory, writes them atomically and saves on Ctrl-C and on errors"
        )
    if not any(_is_subclass(name, Checkpoint) for name in names):
        trainer.callbacks = [*kept, Namespace(class_path=CHECKPOINT, init_args=Namespace())]


def _class_path(callback: object) -> str | None:
    return callback.get("class_path") if isinstance(callback, Namespace) else None


def _is_subclass(class_path: str | None, base: type) -> bool:
    try:
        return isinstance(class_path, str) and issubclass(config_class(class_path), base)
    except (ImportError, AttributeError, TypeError, ValueError):
        return False


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

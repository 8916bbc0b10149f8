"""``python -m experiments <command> ...``: every command of the project in one table.

fit / validate / test / predict are LightningCLI's (experiments/cli.py); each other command is a
plain function whose signature and docstring jsonargparse turns into its options. A command's
expected failures (bad input, a missing file, nothing completed) print as one ``error:`` line
instead of a traceback. ``python -m experiments <command> --help`` documents a command's options.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    """A command: the function it runs (``module:name``, imported only when it runs), one line of
    help, and the exceptions (``module:name``) that mean bad input and print without a traceback.
    ``lightning``: the function is the LightningCLI and takes the whole argument list."""

    function: str
    help: str
    expected: tuple[str, ...] = ("builtins:ValueError",)
    lightning: bool = False


LIGHTNING = "experiments.cli:lightning_cli"
MISSING_FILE = "builtins:FileNotFoundError"
SWEEP_FAILED = "experiments.sweep:SweepFailed"

COMMANDS: dict[str, Command] = {
    "fit": Command(
        LIGHTNING,
        "train (or resume with --ckpt_path last) from a config: --config, --model.*, --data.*, --trainer.*",
        lightning=True,
    ),
    "validate": Command(LIGHTNING, "score a checkpoint on the validation split", lightning=True),
    "test": Command(LIGHTNING, "score a checkpoint on the test split (loss and ROUGE)", lightning=True),
    "predict": Command(
        LIGHTNING, "write a checkpoint's summaries of the test split to predictions.jsonl", lightning=True
    ),
    "evaluate": Command(
        "experiments.evaluate:evaluate",
        "one run on the test split: ROUGE, BERTScore, G-Eval, parameters, runtime, memory",
        ("builtins:ValueError", MISSING_FILE, "experiments.bertscore:ModelUnavailable"),
    ),
    "report": Command(
        "experiments.report:report",
        "tables (metrics, change against a base run) and plots from evaluated runs",
        ("builtins:ValueError", MISSING_FILE),
    ),
    "sweep": Command(
        "experiments.sweep:sweep",
        "a hyperparameter search with Optuna over any fit option: --config experiments/sweeps/lora.yaml",
        ("builtins:ValueError", SWEEP_FAILED),
    ),
    "study": Command(
        "experiments.study:study",
        "the whole comparison: the base, each method's sweep or run, the test split, the report",
        ("builtins:ValueError", SWEEP_FAILED),
    ),
    "pretrain": Command(
        "experiments.pretrain:pretrain",
        "pretrain a small T5 with span corruption on the bundled dialogues (offline)",
    ),
}


def _resolve(path: str) -> object:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def run(name: str, argv: list[str]) -> None:
    """Run command ``name`` with the options ``argv`` (the arguments after the command's name)."""
    command = COMMANDS[name]
    function = _resolve(command.function)
    if command.lightning:
        function([name, *argv])
        return
    from jsonargparse import CLI

    expected = tuple(_resolve(path) for path in command.expected)
    try:
        CLI(function, args=argv)
    except expected as err:  # bad input: the message, not a traceback
        raise SystemExit(f"error: {err}") from None


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {command.help}" for name, command in COMMANDS.items()]
    return (
        "usage: python -m experiments <command> [options]\n\ncommands:\n"
        + "\n".join(lines)
        + ("\n\n`python -m experiments <command> --help` lists a command's options.")
    )


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return
    if argv[0] not in COMMANDS:
        print(f"error: unknown command {argv[0]!r}\n\n{usage()}", file=sys.stderr)
        raise SystemExit(2)
    run(argv[0], argv[1:])
    _end_distributed_run()


def _end_distributed_run() -> None:
    """A multi-process command (DDP, FSDP) that finished ends here, its process group destroyed
    and the process left at once: at interpreter exit, C++ threads of torch.distributed (the
    rendezvous store's) could still be joinable while static destructors ran, and a finished run
    aborted with "terminate called without an active exception" (exit status -6) after writing
    everything. Every file of the run is written (atomically, synced) and the loggers finalised
    before this point; the output streams are flushed before leaving."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(0)


if __name__ == "__main__":
    main()

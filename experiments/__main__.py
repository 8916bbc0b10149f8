"""``python -m experiments <command> ...``: every command of the project in one table.

fit / validate / test / predict are LightningCLI's (experiments/cli.py); the others are this
project's own. ``python -m experiments <command> --help`` documents a command's options.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


def _lightning(argv: list[str]) -> None:
    from experiments.cli import lightning_cli

    lightning_cli(argv)


def _evaluate(argv: list[str]) -> None:
    from experiments.evaluate import evaluate_cli

    evaluate_cli(argv[1:])


def _report(argv: list[str]) -> None:
    from experiments.evaluate import report_cli

    report_cli(argv[1:])


def _sweep(argv: list[str]) -> None:
    from experiments.sweep import sweep_cli

    sweep_cli(argv[1:])


def _study(argv: list[str]) -> None:
    from experiments.study import study_cli

    study_cli(argv[1:])


def _pretrain(argv: list[str]) -> None:
    from experiments.pretrain import pretrain_cli

    pretrain_cli(argv[1:])


# name -> (function of the whole argument list, one line of help)
COMMANDS: dict[str, tuple[Callable[[list[str]], None], str]] = {
    "fit": (
        _lightning,
        "train (or resume with --ckpt_path last) from a config: --config, --model.*, --data.*, --trainer.*",
    ),
    "validate": (_lightning, "score a checkpoint on the validation split"),
    "test": (_lightning, "score a checkpoint on the test split (loss and ROUGE)"),
    "predict": (_lightning, "write a checkpoint's summaries of the test split to predictions.jsonl"),
    "evaluate": (
        _evaluate,
        "one run on the test split: ROUGE, BERTScore, G-Eval, parameters, runtime, memory",
    ),
    "report": (_report, "tables (metrics, change against a base run) and plots from evaluated runs"),
    "sweep": (
        _sweep,
        "a hyperparameter search with Optuna over any fit option: --config experiments/sweeps/lora.yaml",
    ),
    "study": (
        _study,
        "the whole comparison: the base, each method's sweep or run, the test split, the report",
    ),
    "pretrain": (_pretrain, "pretrain a small T5 with span corruption on the bundled dialogues (offline)"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
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
    COMMANDS[argv[0]][0](argv)


if __name__ == "__main__":
    main()

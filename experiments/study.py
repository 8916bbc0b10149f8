"""``python -m experiments study --config experiments/study.yaml``: the whole comparison, one command.

    1. the untuned base, evaluated on the test split          -> <output_dir>/eval/base
    2. for each method, in order: its sweep (the best trial wins) or one fixed ``fit``, then that
       run evaluated on the test split (ROUGE, BERTScore, G-Eval when configured, parameters,
       runtime, footprint)                                     -> <output_dir>/sweeps, runs, eval
    3. the report: metrics per run, the change against the base, plots   -> <output_dir>/report

A study file:

    output_dir: runs/study
    base_config: experiments/configs/lora.yaml     # the model and data the untuned base is scored with
    methods:                                       # run name -> a sweep (a file, or inline) or a config
      full: {config: experiments/configs/full.yaml}
      lora: {sweep: experiments/sweeps/lora.yaml}
    evaluate:                                      # evaluate's options for every run
      bertscore_model: roberta-large
      overrides: ["--data.limit_test=64"]          # the test examples and generation only (--data.*
                                                   # of the test split, --model.generation.num_beams, --model.generation.max_new_tokens)
    overrides: []                                  # fit options for every run (a demo's small limits)

Every stage skips what is done: a finished sweep is not rerun (an interrupted one resumes), a
fixed run with its ``fit_done.json`` is not refitted (an interrupted one resumes from its
``last.ckpt``), an evaluation is resumed (``evaluate --resume true``): a record whose stages
all completed with the same settings is kept, one cut short (killed during BERTScore, a G-Eval
failure) gets only its missing metrics, on the predictions it has. So a crash or Ctrl-C loses
at most the trial in flight.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import yaml

from experiments import evaluate as evaluation
from experiments.geval import GEvalConfig
from experiments.report import report
from experiments.sweep import sweep
from peftcore.files import write_atomically


def study(
    base_config: str | None = None,
    methods: dict[str, dict[str, Any]] | None = None,
    output_dir: str = "runs/study",
    evaluate: dict[str, Any] | None = None,
    overrides: list[str] | None = None,
) -> dict:
    """Run the comparison (see the module docstring); returns the report's paths.

    Args:
        base_config: the fit config the untuned base is evaluated with (its model and data).
        methods: ``{run name: {sweep: file or {sweep options}} | {config: fit config, overrides: [...]}}``.
        output_dir: where everything goes.
        evaluate: evaluate's options for every run (``bertscore_model``, ``geval``, ...), and its
            ``overrides``: options of the test examples and generation only (``--data.limit_test=64``,
            ``--model.generation.num_beams=4``), added after the run's own.
        overrides: fit options added to every run and trial.
    """
    if not base_config or not methods:
        raise ValueError("a study needs base_config (the untuned base's fit config) and methods")
    for name, spec in methods.items():
        if not isinstance(spec, dict) or len({"sweep", "config"} & set(spec)) != 1:
            raise ValueError(f"methods[{name!r}] must give a sweep or a config (one of them), got {spec!r}")
    root, extra = Path(output_dir), list(overrides or [])
    options = _evaluate_options(evaluate or {})
    records = [
        _evaluated(root, "base", dict(train_config=base_config, base_model=True, overrides=extra), options)
    ]
    for name, spec in methods.items():
        if "sweep" in spec:
            found = _sweep_file(spec["sweep"])
            result = sweep(
                **{
                    **found,
                    "output_dir": str(root / "sweeps"),
                    "study_name": name,
                    "overrides": [*found.get("overrides", []), *extra],
                }
            )  # SweepFailed when none completed
            run = Path(result["best_run"])
        else:
            run = _fit_once(root, name, spec["config"], [*spec.get("overrides", []), *extra])
        records.append(
            _evaluated(
                root,
                name,
                dict(train_config=str(run / "config.yaml"), ckpt_path=str(run / "checkpoints" / "best.ckpt")),
                options,
            )
        )
    report(records=records, out_dir=str(root / "report"), base_run="base")
    return {"records": records, "report": str(root / "report" / "report.md")}


def _sweep_file(spec: Any) -> dict:
    if isinstance(spec, dict):
        return dict(spec)
    found = yaml.safe_load(Path(spec).read_text())
    if not isinstance(found, dict):
        raise ValueError(f"{spec} is not a sweep file (a mapping of sweep options)")
    return found


def _fit_once(root: Path, name: str, config: str, overrides: list[str]) -> Path:
    """One fit of ``config`` into ``<root>/runs/<name>/run``: skipped when done, resumed when not."""
    from experiments.cli import RunPlace, finish_external_runs, lightning_cli

    run = root / "runs" / name / "run"
    if (run / "fit_done.json").exists():
        print(f"study: {name}: fitted already ({run})")
        return run
    args = [
        "fit",
        "--config",
        config,
        *overrides,
    ]
    if (run / "checkpoints" / "last.ckpt").exists():
        args += ["--ckpt_path", str(run / "checkpoints" / "last.ckpt")]
    cli = lightning_cli(args, place=RunPlace(str(root / "runs"), name, "run", group=root.name))
    finish_external_runs(cli.trainer)
    write_atomically(run / "fit_done.json", json.dumps({"global_step": cli.trainer.global_step}) + "\n")
    return run


# evaluate's arguments the study sets for each run; the study file's evaluate section gives the others.
SET_BY_STUDY = ("train_config", "run_name", "ckpt_path", "adapter", "base_model", "output_dir", "resume")
# Data options that do not change the test examples or their summaries: evaluate would ignore them.
NOT_FOR_EVALUATION = (
    "train_split",
    "val_split",
    "target_summaries",
    "batch_size",
    "group_by_length",
    "limit_train",
    "limit_val",
    "seed",
)


def _evaluate_options(evaluate: dict[str, Any]) -> dict[str, Any]:
    """The study file's evaluate section as evaluate's keyword arguments, checked."""
    options = dict(evaluate)
    allowed = [name for name in inspect.signature(evaluation.evaluate).parameters if name not in SET_BY_STUDY]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"evaluate has {unknown}: the study sets those itself or evaluate has no such option; "
            f"evaluate's options here: {', '.join(allowed)}"
        )
    options["overrides"] = _evaluation_overrides(options.get("overrides") or [])
    if isinstance(options.get("geval"), dict):
        options["geval"] = GEvalConfig(**options["geval"])
    return options


def _evaluation_overrides(overrides: Any) -> list[str]:
    """evaluate.overrides: options of the test examples (``--data.*``) and of generation
    (``--model.generation.num_beams``, ``--model.generation.max_new_tokens``); anything else would train or build
    another model than the run's, or be ignored, so it is refused."""
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise ValueError(
            f"evaluate.overrides must be a list of options, e.g. ['--data.limit_test=64'], got {overrides!r}"
        )
    for option in (o for o in overrides if o.startswith("--")):
        key = option[2:].split("=", 1)[0]
        section, _, field = key.partition(".")
        generation = key in ("model.generation.num_beams", "model.generation.max_new_tokens")
        if not (
            generation or (section == "data" and field and field.split(".")[0] not in NOT_FOR_EVALUATION)
        ):
            raise ValueError(
                f"evaluate.overrides has {option!r}: it takes the test examples' --data.* options "
                f"(not {', '.join(NOT_FOR_EVALUATION)}) and --model.generation.num_beams, --model.generation.max_new_tokens; "
                "training options go in the study's or the method's overrides"
            )
    return list(overrides)


def _evaluated(root: Path, name: str, source: dict, options: dict) -> str:
    """``<root>/eval/<name>``: evaluated, or what an earlier evaluation left unfinished completed
    (evaluate's resume; a finished record with the same settings is kept as it is)."""
    run_overrides = source.pop("overrides", [])
    evaluation.evaluate(
        run_name=name,
        output_dir=str(root / "eval"),
        resume=True,
        **source,
        **{**options, "overrides": [*run_overrides, *options["overrides"]]},
    )
    return str(root / "eval" / name)

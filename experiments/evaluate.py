"""``python -m experiments evaluate``: one run (a checkpoint, an exported adapter, or the untuned base model) on the test
split: generate summaries, then ROUGE, BERTScore, G-Eval (when an API is configured) and the
efficiency figures, written as ``<output_dir>/eval_record.json`` next to the predictions, stage
by stage; the record says which stages completed, and ``--resume true`` computes only the rest.
``python -m experiments report`` (experiments/report.py) compares such records.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import NoReturn

import lightning as L
import torch
import yaml
from lightning.pytorch.utilities import rank_zero_info

import peftcore
from experiments.bertscore import bert_scores
from experiments.bertscore import check_available as check_bertscore_model
from experiments.callbacks import recorded_runtime
from experiments.geval import GEvalConfig, GEvalUnavailable, check_judge, geval_available, geval_scores
from experiments.metrics import rouge_scores
from peftcore.files import write_atomically

RECORD_NAME = "eval_record.json"
# What an evaluation computes, in order. A record's "completed" maps each stage done to the
# settings it was done with; "pending" lists the stages still to do.
STAGES = ("predictions", "rouge", "bertscore", "geval")
# G-Eval settings that change its scores (a rerun with others scores again).
GEVAL_SCORING = (
    "model",
    "base_url",
    "n_samples",
    "temperature",
    "use_logprobs",
    "top_logprobs",
    "max_tokens",
)


def evaluate(
    train_config: str | None = None,
    run_name: str = "run",
    ckpt_path: str | None = None,
    adapter: str | None = None,
    base_model: bool = False,
    output_dir: str = "runs/eval",
    num_beams: int | None = None,
    max_new_tokens: int | None = None,
    bertscore_model: str | None = "roberta-large",
    bertscore_layers: int | None = None,
    geval: GEvalConfig = GEvalConfig(),  # noqa: B008 (read, never changed: one shared default is safe)
    overrides: list[str] | None = None,
    resume: bool = False,
    adapters: dict[str, str] | None = None,
) -> dict:
    """Evaluate one run on its config's test split and write ``<output_dir>/<run_name>/eval_record.json``.

    The record is rewritten as each stage completes (the predictions with the efficiency
    figures, ROUGE, BERTScore, G-Eval); its ``completed`` says which stages are done and with
    what settings, ``pending`` which are still to do. A failure loses only what was still to
    come; a G-Eval failure is recorded, said plainly, and ends the command with status 1.

    Args:
        train_config: the run's training YAML (model, data and trainer sections).
        run_name: the run's column name in reports.
        ckpt_path: a Lightning checkpoint of the run (trainable state only); ``last`` or ``best``
            is the newest run's ``last.ckpt`` / ``best.ckpt`` (the config's logger names the runs).
        adapter: or a directory holding an adapter in peft's format. The config's model is built
            first: with a method in it, the adapter must be the same method and shape; add
            ``--overrides '["--model.peft=null"]'`` to build the base bare and load the adapter as saved.
        base_model: evaluate the untuned base model instead (no adapter, nothing trained).
        output_dir: records go to ``<output_dir>/<run_name>/``.
        num_beams: generation beams (default: the config's).
        max_new_tokens: longest summary (default: the config's).
        bertscore_model: ``roberta-large`` (needs the hub or its local cache), a local path with
            bertscore_layers, ``offline:all-MiniLM-L6-v2`` (the offline stand-in: its scores are
            not comparable with roberta-large's), or null to skip BERTScore. An unreachable model
            is an error before anything is generated.
        bertscore_layers: the layer to use with a local bertscore_model.
        geval: G-Eval settings (OpenAI or any compatible server); skipped with a note when no API
            key or base_url is configured.
        overrides: extra LightningCLI arguments, e.g. ``["--data.limit_test=20"]``.
        resume: keep what an earlier evaluation into the same directory completed with the same
            settings (its predictions, its metrics) and compute only what is missing; nothing at
            all when nothing is. An earlier record of other settings is replaced. ``last`` and
            ``best`` checkpoints are never resumed (they name a newer file as runs go on).
        adapters: instead of one run, several adapters over one base, ``{name: directory}``: the
            config's base model is built and loaded once, bare (each adapter's adapter_config.json
            says what it is), every adapter is loaded into it by name, and each is evaluated as
            the run ``name`` (``<output_dir>/<name>/``). Returns the records by name.
    """
    if not train_config:
        raise ValueError(
            "--train_config is required: the run's training YAML (e.g. experiments/configs/lora.yaml)"
        )
    if sum([ckpt_path is not None, adapter is not None, base_model, adapters is not None]) != 1:
        raise ValueError("give exactly one of ckpt_path, adapter, adapters or base_model: true")
    if adapters is not None and (not isinstance(adapters, dict) or not adapters):
        raise ValueError(f"--adapters takes a mapping of names to adapter directories, got {adapters!r}")
    check_bertscore_model(bertscore_model)  # before minutes of generation, not after
    geval = geval or GEvalConfig()
    geval_on, geval_note = geval_available(geval)
    from experiments.cli import NAMED_CHECKPOINTS

    def stages(source_ckpt: str | None, source_adapter: str | None) -> dict[str, dict]:
        return _wanted_stages(
            train_config,
            source_ckpt,
            source_adapter,
            base_model,
            num_beams,
            max_new_tokens,
            overrides,
            bertscore_model,
            bertscore_layers,
            geval if geval_on else None,
        )

    scoring = (bertscore_model, bertscore_layers, geval, geval_on, geval_note)
    if adapters is not None:
        built: list = []  # the base, built once when the first adapter needs generating

        def over_one_base(name: str, directory: str, out: Path) -> tuple[dict, list[dict]]:
            if not built:
                built.extend(
                    _build(
                        train_config,
                        out,
                        num_beams,
                        max_new_tokens,
                        [*(overrides or []), "--model.peft=null"],
                    )
                )
            _model_and_data_config(train_config, out)  # each record keeps what it was evaluated with
            module = built[1]
            peftcore.load_adapter(module.model, directory, name=name)
            peftcore.set_adapter(module.model, name)
            module.reset_efficiency()
            return _predict(
                train_config,
                name,
                None,
                directory,
                False,
                out,
                num_beams,
                max_new_tokens,
                overrides,
                tuple(built),
            )

        return {
            name: _evaluate_one(
                name,
                Path(output_dir) / name,
                stages(None, directory),
                resume,
                lambda out, name=name, directory=directory: over_one_base(name, directory, out),
                *scoring,
            )
            for name, directory in adapters.items()
        }
    out = Path(output_dir) / run_name
    resumable = resume and ckpt_path not in NAMED_CHECKPOINTS
    return _evaluate_one(
        run_name,
        out,
        stages(ckpt_path, adapter),
        resumable,
        lambda out: _predict(
            train_config, run_name, ckpt_path, adapter, base_model, out, num_beams, max_new_tokens, overrides
        ),
        *scoring,
    )


def _evaluate_one(
    run_name: str,
    out: Path,
    wanted: dict[str, dict],
    resume: bool,
    predict,
    bertscore_model: str | None,
    bertscore_layers: int | None,
    geval: GEvalConfig,
    geval_on: bool,
    geval_note: str,
) -> dict:
    """One record: its predictions (``predict(out)``) unless an earlier record of the same
    settings has them, then the metric stages it lacks."""
    record = _earlier_record(out, wanted) if resume else None
    if record is not None and not _missing(record, wanted):
        print(f"evaluate: {run_name}: evaluated already ({out / RECORD_NAME})")
        return record
    if record is None:
        record, rows = predict(out)
        record["completed"] = {"predictions": wanted["predictions"]}
    else:
        print(
            f"evaluate: {run_name}: resuming {out / RECORD_NAME}: {', '.join(_missing(record, wanted))} still to do"
        )
        rows = [json.loads(line) for line in Path(record["predictions"]).read_text().splitlines()]
    # a finished G-Eval keeps its own settings (judge, method, failures)
    if "geval" not in record["completed"]:
        record["settings"]["geval"] = geval_note
    _score(record, rows, wanted, out, bertscore_model, bertscore_layers, geval, geval_on, geval_note)
    rank_zero_info(f"wrote {out / RECORD_NAME}")
    return record


def _score(
    record: dict,
    rows: list[dict],
    wanted: dict[str, dict],
    out: Path,
    bertscore_model: str | None,
    bertscore_layers: int | None,
    geval: GEvalConfig,
    geval_on: bool,
    geval_note: str,
) -> None:
    """Compute the metric stages the record still lacks, rewriting it after each one."""
    metrics, settings = record["metrics"], record["settings"]

    def done(stage: str | None = None) -> None:
        if stage is not None:
            record["completed"][stage] = wanted[stage]
        record["pending"] = _missing(record, wanted)
        write_atomically(out / RECORD_NAME, json.dumps(record, indent=2))

    done()
    predictions = [row["prediction"] for row in rows]
    references = [
        row["reference"] if isinstance(row["reference"], list) else [row["reference"]] for row in rows
    ]
    todo = _missing(record, wanted)
    if "rouge" in todo:
        metrics.update(rouge_scores(predictions, references))
        done("rouge")
    if "bertscore" in todo:
        metrics.update(
            bert_scores(predictions, references, model_type=bertscore_model, num_layers=bertscore_layers)
        )
        settings["bertscore_model"] = bertscore_model
        done("bertscore")
    if "geval" in todo:
        try:
            check_judge(geval)
            result = geval_scores([row["dialogue"] for row in rows], predictions, geval)
        except GEvalUnavailable as err:
            settings["geval"] = {"model": geval.model, "base_url": geval.base_url, "error": str(err)}
            done()
            rank_zero_info(f"wrote {out / RECORD_NAME} without G-Eval")
            raise SystemExit(f"error: {err}") from None
        metrics.update({k: result[k] for k in ("relevance", "coherence", "consistency", "fluency")})
        settings["geval"] = {"model": geval.model, "method": result["method"], "failures": result["failures"]}
        done("geval")
    elif not geval_on:
        rank_zero_info(geval_note)


def _wanted_stages(
    train_config: str,
    ckpt_path: str | None,
    adapter: str | None,
    base_model: bool,
    num_beams: int | None,
    max_new_tokens: int | None,
    overrides: list[str] | None,
    bertscore_model: str | None,
    bertscore_layers: int | None,
    geval: GEvalConfig | None,
) -> dict[str, dict]:
    """The stages this evaluation asks for, each with the settings its result depends on."""
    text = Path(train_config).read_text() if Path(train_config).is_file() else ""
    wanted: dict[str, dict] = {
        "predictions": {
            "train_config": train_config,
            "train_config_sha256": hashlib.sha256(text.encode()).hexdigest(),
            "ckpt_path": ckpt_path,
            "adapter": adapter,
            "base_model": base_model,
            "num_beams": num_beams,
            "max_new_tokens": max_new_tokens,
            "overrides": list(overrides or []),
        },
        "rouge": {},
    }
    if bertscore_model:
        wanted["bertscore"] = {"model": bertscore_model, "layers": bertscore_layers}
    if geval is not None:
        wanted["geval"] = {name: getattr(geval, name) for name in GEVAL_SCORING}
    return wanted


def _missing(record: dict, wanted: dict[str, dict]) -> list[str]:
    completed = record.get("completed") or {}
    return [stage for stage in STAGES if stage in wanted and completed.get(stage) != wanted[stage]]


def _earlier_record(out: Path, wanted: dict[str, dict]) -> dict | None:
    """The record an earlier evaluation left in ``out``, when its predictions are of the same
    settings and still there; else None (the evaluation starts afresh)."""
    path = out / RECORD_NAME
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    same = (record.get("completed") or {}).get("predictions") == wanted["predictions"]
    return record if same and Path(record.get("predictions", "")).is_file() else None


def _refuse(message: str) -> NoReturn:
    raise ValueError(message)


def _predict(
    train_config: str,
    run_name: str,
    ckpt_path: str | None,
    adapter: str | None,
    base_model: bool,
    out: Path,
    num_beams: int | None,
    max_new_tokens: int | None,
    overrides: list[str] | None,
    built: tuple | None = None,
) -> tuple[dict, list[dict]]:
    """Build the run and generate its summaries of the test split (written to the predictions
    file by the module's PredictionWriter): a record with the efficiency figures, and the rows.
    ``built`` is a model already built and given its adapter (``--adapters``: one base, several)."""
    from experiments.checkpointing import read_checkpoint
    from experiments.cli import NAMED_CHECKPOINTS, newest_checkpoint, runs_of, same_model

    cli, module, data = built or _build(train_config, out, num_beams, max_new_tokens, overrides)
    module.hparams.predictions_path = str(out / "predictions.jsonl")  # PredictionWriter's file
    epoch: int | None = 0  # the untuned base trained for 0 epochs; an exported adapter does not say
    runtime: float | None = 0.0
    if ckpt_path in NAMED_CHECKPOINTS:
        root = runs_of(cli.config)
        if root is None:
            raise ValueError(
                f"--ckpt_path {ckpt_path} needs the config's TensorBoard logger to find the runs"
            )
        ckpt_path = str(newest_checkpoint(root, ckpt_path))
    if ckpt_path is not None:
        checkpoint = read_checkpoint(
            ckpt_path
        )  # weights_only=True; a damaged file is named with the run's others
        same_model(cli.config.model, checkpoint.get("hyper_parameters") or {}, ckpt_path, _refuse)
        module.on_load_checkpoint(checkpoint)
        module.load_state_dict(checkpoint["state_dict"], strict=False)
        epoch, runtime = checkpoint.get("epoch", 0) + 1, round(recorded_runtime(checkpoint), 1)
    elif adapter is not None:
        module.forget_pending_start()  # the adapter is what it was trained to
        if built is None:
            _load_adapter(module.model, adapter, train_config)
        epoch = runtime = None
    else:
        module.forget_pending_start()
        if getattr(module.model, "peftcore_config", None) is not None:
            peftcore.unload(module.model, merge=False)
        for param in module.model.parameters():
            param.requires_grad_(False)

    trainer = L.Trainer(
        accelerator=cli.trainer.accelerator, devices=1, logger=False, enable_progress_bar=False
    )
    rows = [row for batch in trainer.predict(module, datamodule=data) for row in batch]
    metrics: dict = {**module.efficiency(), "epoch": epoch, "train_runtime": runtime}
    if torch.cuda.is_available():
        metrics["peak_accelerator_memory"] = torch.cuda.max_memory_allocated() / 2**30
    settings: dict = {
        "config": train_config,
        "ckpt_path": ckpt_path,
        "adapter": adapter,
        "base_model": base_model,
        "examples": len(rows),
        "test_set": _test_set(cli.config.as_dict().get("data") or {}),
        "num_beams": module.generation.num_beams,
        "max_new_tokens": module.generation.max_new_tokens,
        "method": type(getattr(module.model, "peftcore_config", None)).__name__.replace(
            "NoneType", "full or none"
        ),
    }
    record = {
        "run": run_name,
        "metrics": metrics,
        "settings": settings,
        "predictions": module.hparams.predictions_path,
    }
    return record, rows


def _build(
    train_config: str,
    out: Path,
    num_beams: int | None,
    max_new_tokens: int | None,
    overrides: list[str] | None,
) -> tuple:
    """The CLI, its model and its data, built from the run's config as evaluate reads it."""
    from experiments.cli import lightning_cli

    args = ["--config", str(_model_and_data_config(train_config, out)), *(overrides or [])]
    args += [f"--model.generation.num_beams={num_beams}"] * (num_beams is not None)
    args += [f"--model.generation.max_new_tokens={max_new_tokens}"] * (max_new_tokens is not None)
    cli = lightning_cli(args, run=False)
    return cli, cli.model, cli.datamodule


def _test_set(data: dict) -> dict:
    """What the test examples are: the records of runs scored on different ones do not compare."""
    return {
        key: data.get(key) for key in ("dataset", "data_files", "test_split", "summary_field", "limit_test")
    }


def _load_adapter(model: torch.nn.Module, adapter: str, train_config: str) -> None:
    """peftcore.load_adapter, its remedy said for the command line: a model the config already
    gave an adapter takes only the same method and shape."""
    held = getattr(model, "peftcore_config", None)
    try:
        peftcore.load_adapter(model, adapter)
    except ValueError as err:
        if held is None:
            raise
        message = re.sub(r"\s*\(or call peftcore\.unload\(model\) first\)", "", str(err))
        raise ValueError(
            f"{message}. {train_config} builds the model with a {type(held).__name__} already; to evaluate the adapter "
            "as it was saved, build the base bare: add --overrides '[\"--model.peft=null\"]' (the adapter's "
            "adapter_config.json then says what it is), or give a config of the adapter's own method and shape"
        ) from None


# Keys a `fit` command saves in a run's config.yaml that belong to the command, not to the model,
# data or trainer: evaluate takes the run's config with them left out.
COMMAND_KEYS = ("ckpt_path", "weights_only")


def _model_and_data_config(train_config: str, out: Path) -> Path:
    """``train_config`` as evaluate reads it: a run's saved config.yaml works as well as the YAML it
    was trained from. Written to ``<out>/train_config.yaml``, the record of what was evaluated."""
    config = yaml.safe_load(Path(train_config).read_text()) or {}
    if not isinstance(config, dict):
        raise ValueError(
            f"{train_config} is not a fit config (a mapping of model, data and trainer sections)"
        )
    kept = {k: v for k, v in config.items() if k not in COMMAND_KEYS}
    return write_atomically(out / "train_config.yaml", yaml.safe_dump(kept, sort_keys=False))

"""``python -m experiments evaluate`` and ``python -m experiments report``.

evaluate: one run (a checkpoint, an exported adapter, or the untuned base model) on the test
split: generate summaries, then ROUGE, BERTScore, G-Eval (when an API is configured) and the
efficiency figures, written as ``<output_dir>/eval_record.json`` next to the predictions.
report: several such records -> tables (+ % change against a base run) and plots.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import lightning as L
import torch
import yaml
from jsonargparse import CLI
from lightning.pytorch.utilities import rank_zero_info

import peftcore
from peftcore.files import write_atomically
from experiments.bertscore import bert_scores
from experiments.bertscore import ModelUnavailable
from experiments.bertscore import check_available as check_bertscore_model
from experiments.geval import GEvalConfig, GEvalUnavailable, check_judge, geval_available, geval_scores
from experiments.metrics import rouge_scores
from experiments.report import write_report


def evaluate(
    train_config: Optional[str] = None,
    run_name: str = "run",
    ckpt_path: Optional[str] = None,
    adapter: Optional[str] = None,
    base_model: bool = False,
    output_dir: str = "runs/eval",
    num_beams: Optional[int] = None,
    max_new_tokens: Optional[int] = None,
    bertscore_model: Optional[str] = "roberta-large",
    bertscore_layers: Optional[int] = None,
    geval: GEvalConfig = GEvalConfig(),
    overrides: Optional[list[str]] = None,
) -> dict:
    """Evaluate one run on its config's test split and write ``<output_dir>/<run_name>/eval_record.json``.

    The record is rewritten as each metric completes (ROUGE, then BERTScore, then G-Eval), so a
    failure loses only what was still to come; a G-Eval failure is recorded, said plainly, and
    ends the command with status 1 (a rerun resumes G-Eval from its request cache).

    Args:
        train_config: the run's training YAML (model, data and trainer sections).
        run_name: the run's column name in reports.
        ckpt_path: a Lightning checkpoint of the run (trainable state only); ``last`` or ``best``
            is the newest run's ``last.ckpt`` / ``best.ckpt`` (the config's logger names the runs).
        adapter: or a directory holding an adapter in peft's format.
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
    """
    if not train_config:
        raise ValueError("--train_config is required: the run's training YAML (e.g. experiments/configs/lora.yaml)")
    if sum([ckpt_path is not None, adapter is not None, base_model]) != 1:
        raise ValueError("give exactly one of ckpt_path, adapter or base_model: true")
    check_bertscore_model(bertscore_model)  # before minutes of generation, not after
    geval = geval or GEvalConfig()
    geval_on, geval_note = geval_available(geval)
    from experiments.cli import NAMED_CHECKPOINTS, lightning_cli, newest_checkpoint, runs_of

    out = Path(output_dir) / run_name
    args = ["--config", str(_model_and_data_config(train_config, out)), *(overrides or [])]
    args += [f"--model.num_beams={num_beams}"] * (num_beams is not None)
    args += [f"--model.max_new_tokens={max_new_tokens}"] * (max_new_tokens is not None)
    cli = lightning_cli(args, run=False)
    module, data = cli.model, cli.datamodule
    module.hparams.predictions_path = str(out / "predictions.jsonl")
    epoch: Optional[int] = 0  # the untuned base trained for 0 epochs; an exported adapter does not say
    runtime: Optional[float] = 0.0
    if ckpt_path in NAMED_CHECKPOINTS:
        root = runs_of(cli.config)
        if root is None:
            raise ValueError(f"--ckpt_path {ckpt_path} needs the config's TensorBoard logger to find the runs")
        ckpt_path = str(newest_checkpoint(root, ckpt_path))
    if ckpt_path is not None:
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        module.on_load_checkpoint(checkpoint)
        module.load_state_dict(checkpoint["state_dict"], strict=False)
        epoch, runtime = checkpoint.get("epoch", 0) + 1, round(module.train_runtime, 1)
    elif adapter is not None:
        peftcore.load_adapter(module.model, adapter)
        epoch = runtime = None
    else:
        if getattr(module.model, "peftcore_config", None) is not None:
            peftcore.unload(module.model, merge=False)
        for param in module.model.parameters():
            param.requires_grad_(False)

    trainer = L.Trainer(accelerator=cli.trainer.accelerator, devices=1, logger=False, enable_progress_bar=False)
    trainer.predict(module, datamodule=data)
    rows = [json.loads(line) for line in Path(module.hparams.predictions_path).read_text().splitlines()]
    predictions = [row["prediction"] for row in rows]
    references = [row["reference"] if isinstance(row["reference"], list) else [row["reference"]] for row in rows]

    metrics: dict = {**module.efficiency(), "epoch": epoch, "train_runtime": runtime}
    if torch.cuda.is_available():
        metrics["peak_accelerator_memory"] = torch.cuda.max_memory_allocated() / 2**30
    settings: dict = {"config": train_config, "ckpt_path": ckpt_path, "adapter": adapter, "base_model": base_model,
                      "examples": len(rows), "num_beams": module.hparams.num_beams,
                      "max_new_tokens": module.hparams.max_new_tokens, "geval": geval_note,
                      "method": type(getattr(module.model, "peftcore_config", None)).__name__.replace("NoneType", "full or none")}
    record = {"run": run_name, "metrics": metrics, "settings": settings, "predictions": module.hparams.predictions_path}

    def save() -> None:
        write_atomically(out / "eval_record.json", json.dumps(record, indent=2))

    metrics.update(rouge_scores(predictions, references))
    save()
    if bertscore_model:
        metrics.update(bert_scores(predictions, references, model_type=bertscore_model, num_layers=bertscore_layers))
        settings["bertscore_model"] = bertscore_model
        save()
    if geval_on:
        try:
            check_judge(geval)
            result = geval_scores([row["dialogue"] for row in rows], predictions, geval)
        except GEvalUnavailable as err:
            settings["geval"] = {"model": geval.model, "base_url": geval.base_url, "error": str(err)}
            save()
            rank_zero_info(f"wrote {out / 'eval_record.json'} without G-Eval")
            raise SystemExit(f"error: {err}") from None
        metrics.update({k: result[k] for k in ("relevance", "coherence", "consistency", "fluency")})
        settings["geval"] = {"model": geval.model, "method": result["method"], "failures": result["failures"]}
        save()
    else:
        rank_zero_info(geval_note)
    rank_zero_info(f"wrote {out / 'eval_record.json'}")
    return record


# Keys a `fit` command saves in a run's config.yaml that belong to the command, not to the model,
# data or trainer: evaluate takes the run's config with them left out.
COMMAND_KEYS = ("ckpt_path", "weights_only")


def _model_and_data_config(train_config: str, out: Path) -> Path:
    """``train_config`` as evaluate reads it: a run's saved config.yaml works as well as the YAML it
    was trained from. Written to ``<out>/train_config.yaml``, the record of what was evaluated."""
    config = yaml.safe_load(Path(train_config).read_text()) or {}
    if not isinstance(config, dict):
        raise ValueError(f"{train_config} is not a fit config (a mapping of model, data and trainer sections)")
    kept = {k: v for k, v in config.items() if k not in COMMAND_KEYS}
    return write_atomically(out / "train_config.yaml", yaml.safe_dump(kept, sort_keys=False))


def report(records: Optional[list[str]] = None, out_dir: str = "runs/report", base_run: Optional[str] = None) -> None:
    """Tables (Markdown, CSV), % change against ``base_run`` and plots from evaluation records.

    Args:
        records: ``eval_record.json`` files or the run directories holding them.
        out_dir: where report.md, metrics.csv, change.csv and the PNGs go.
        base_run: the run (by name) the % change table compares against.
    """
    if not records:
        raise ValueError("--records is required: a list of eval_record.json files or run directories")
    written = write_report(records, out_dir, base_run=base_run)
    print(Path(written["markdown"]).read_text() if "markdown" in written else written)


def evaluate_cli(argv: list[str]) -> None:
    try:
        CLI(evaluate, args=argv)
    except (ValueError, FileNotFoundError, ModelUnavailable) as err:  # bad input: the message, not a traceback
        raise SystemExit(f"error: {err}") from None


def report_cli(argv: list[str]) -> None:
    CLI(report, args=argv)

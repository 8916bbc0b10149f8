"""Seq2SeqFineTuner: one LightningModule for every method (full, LoRA, QLoRA, IA3).

The model is built, optionally quantized, then given an adapter, all in ``__init__``:

    from_pretrained(name | path)  or  T5 config of a named shape with random weights (explicit)
    -> peftcore.quantize(model, NF4Config)      (QLoRA)
    -> peftcore.inject(model, the method's config)   (any of peftcore.methods.METHODS)

Checkpoints hold only what trains (plus optimizer, scheduler and loop state), so a t5-base LoRA
checkpoint is megabytes; the frozen base is rebuilt from the same settings on resume.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import time
from pathlib import Path
from typing import Any, NoReturn, Union

import lightning as L
import torch
import transformers
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

import peftcore
from experiments.callbacks import TrainingPlace
from experiments.data import ASSETS, set_sampler_epoch, tokenizer_path
from experiments.metrics import ROUGE_KEYS, Rouge
from peftcore import methods
from peftcore.config import NF4Config
from peftcore.files import write_atomically
from peftcore.loraplus import param_groups
from peftcore.t5 import SHAPES, t5_config

OPTIMIZERS = ("adamw", "paged_adamw")

# Checkpoints store the hyperparameters, method configs included; torch.load(weights_only=True)
# (Lightning's default on resume) unpickles only allow-listed classes. These are plain dataclasses.
torch.serialization.add_safe_globals([*methods.config_classes(), NF4Config])
# The method option: any method's config (the CLI then knows their fields).
MethodConfig = Union[methods.config_classes()]  # noqa: UP007 (a Union of a runtime tuple)


def method_fields() -> str:
    """One line per method: its config class and its fields (for ``fit --help``)."""
    return "; ".join(
        f"{cls.__name__} ({', '.join(f.name for f in dataclasses.fields(cls))})"
        for cls in methods.config_classes()
    )


BUNDLED = "bundled:"  # pretrained: bundled:t5-tiny-dialogue names a model shipped in experiments/assets


def _bundled_model(name: str) -> Path:
    path = ASSETS / name
    if not (path / "config.json").is_file():
        shipped = sorted(p.name for p in ASSETS.iterdir() if (p / "config.json").is_file())
        raise ValueError(f"no bundled model {name!r}; the bundled models are {shipped}")
    return path


def check_model_source(pretrained: str | None, shape: str | None, random_init: bool) -> None:
    """Exactly one of: real weights from ``pretrained``, or a named shape with ``random_init``."""
    if pretrained and shape:
        raise ValueError(f"give either pretrained ({pretrained!r}) or shape ({shape!r}), not both")
    if pretrained:
        if pretrained.startswith(BUNDLED):
            _bundled_model(pretrained.removeprefix(BUNDLED))
        return
    if not shape:
        raise ValueError("set pretrained (a hub name such as google-t5/t5-base, or a local path) or shape")
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; known shapes: {sorted(SHAPES)}")
    if not random_init:
        raise ValueError(
            f"shape={shape!r} builds a model with random weights; set random_init: true to ask for that explicitly, "
            "or set pretrained to load real weights"
        )


def build_model(
    pretrained: str | None, shape: str | None, random_init: bool, gated: bool, dropout_rate: float | None
) -> transformers.T5ForConditionalGeneration:
    """The model ``check_model_source`` allows: real weights, or a named shape's random ones."""
    check_model_source(pretrained, shape, random_init)
    overrides = {} if dropout_rate is None else {"dropout_rate": dropout_rate}
    if pretrained:
        if pretrained.startswith(BUNDLED):
            pretrained = str(_bundled_model(pretrained.removeprefix(BUNDLED)))
        # float32 whatever the file stores (the shipped tiny base is bfloat16 on disk): Lightning's
        # precision setting decides the compute dtype.
        return transformers.T5ForConditionalGeneration.from_pretrained(
            pretrained, dtype=torch.float32, **overrides
        )
    config = t5_config(shape, gated=gated)
    for key, value in overrides.items():
        setattr(config, key, value)
    return transformers.T5ForConditionalGeneration(config)


def with_tokenizer_path(peft: MethodConfig) -> MethodConfig:
    """``peft`` with its ``tokenizer`` (prompt tuning's text init) as a hub name or a path: a
    bundled name (``bundled:t5-tokenizer``) becomes the shipped tokenizer's path, found from any
    working directory (the saved hyperparameters keep the portable name)."""
    tokenizer = getattr(peft, "tokenizer", None)
    return peft if tokenizer is None else dataclasses.replace(peft, tokenizer=tokenizer_path(tokenizer))


def _check_training(
    optimizer: str,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    warmup_ratio: float,
    loraplus_lr_ratio: float | None,
    num_beams: int,
    max_new_tokens: int,
    dropout_rate: float | None,
    gpu_budget_bytes: int | None,
) -> None:
    """Refuse, by the option's name, values that torch or generate would take with a confusing
    error (``num_beams: 0`` divides by zero) or without one (a negative weight decay)."""

    def refuse(name: str, value: object, allowed: str) -> NoReturn:
        raise ValueError(f"model.{name} must be {allowed}, got {value!r}")

    if optimizer not in OPTIMIZERS:
        refuse("optimizer", optimizer, f"one of {OPTIMIZERS}")
    if not 0.0 <= warmup_ratio < 1.0:
        refuse("warmup_ratio", warmup_ratio, "in [0, 1)")
    if loraplus_lr_ratio is not None and not loraplus_lr_ratio > 0:
        refuse("loraplus_lr_ratio", loraplus_lr_ratio, "a positive number (about 16 in the paper), or null")
    if not (math.isfinite(lr) and lr > 0):
        refuse("lr", lr, "a positive number (the peak learning rate, e.g. 1e-3)")
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        refuse("weight_decay", weight_decay, "a number >= 0 (0 turns weight decay off)")
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        refuse("betas", list(betas), "two numbers in [0, 1), e.g. [0.9, 0.999]")
    if num_beams < 1:
        refuse("num_beams", num_beams, "an integer >= 1 (1 is greedy decoding)")
    if max_new_tokens < 1:
        refuse("max_new_tokens", max_new_tokens, "an integer >= 1 (the longest generated summary, in tokens)")
    if dropout_rate is not None and not 0.0 <= dropout_rate < 1.0:
        refuse("dropout_rate", dropout_rate, "in [0, 1), or null to keep the model's own")
    if gpu_budget_bytes is not None and gpu_budget_bytes < 0:
        refuse(
            "gpu_budget_bytes",
            gpu_budget_bytes,
            "a number of bytes >= 0, or null (all optimizer state on the device)",
        )


class Seq2SeqFineTuner(L.LightningModule):
    """Fine-tunes a T5 model for summarisation with full fine-tuning or any peftcore method.

    Args:
        pretrained: hub name (``google-t5/t5-base``) or local directory of real weights.
        shape: build from a config instead: ``t5-tiny`` | ``t5-small`` | ``t5-base``.
        random_init: must be true with ``shape``: random weights are only ever asked for.
        gated: with ``shape``, the gated feed-forward of T5 v1.1 / flan-t5.
        dropout_rate: override the model's dropout (None keeps the model's own).
        peft: the method's config, e.g. ``{class_path: peftcore.LoRAConfig, init_args: {r: 8}}``;
            None trains every weight (full fine-tuning). The methods and their fields:
            {method_fields}. ``--model.peft.help <config>`` describes each field.
        quantization: an NF4Config to quantize the frozen base first (QLoRA); None keeps it as loaded.
        optimizer: ``adamw`` (torch) or ``paged_adamw`` (peftcore.PagedAdamW).
        lr: peak learning rate.
        weight_decay: decoupled weight decay, applied to matrices only (not to biases, norms,
            or IA3 vectors, which decay toward a meaningless zero).
        betas: AdamW betas.
        warmup_ratio: fraction of the training steps with linear warm-up; then linear decay to 0.
        loraplus_lr_ratio: LoRA+ (Hayou et al., 2024): the B factors and the 1-D adapter
            parameters train at ``lr * loraplus_lr_ratio`` (as peft's create_loraplus_optimizer);
            None (the default) is plain training. peft requires the ratio; so does this: no
            default ratio is assumed (the paper uses about 16).
        gpu_budget_bytes: PagedAdamW's device budget for optimizer state (None: all on device).
        gradient_checkpointing: recompute activations in backward to save memory.
        compile: ``torch.compile`` the loss (forward and backward; generation stays eager), with
            dynamic shapes so that batches of new lengths do not recompile. The first training
            step includes the compilation: its seconds are logged as ``train/first_step_s``.
        num_beams: beams for generation in validation/test/predict.
        max_new_tokens: longest generated summary.
        generate_in_validation: score ROUGE on generated summaries in validation (slower).
        export_best_adapter: after each validation with a new best loss, save the adapter in
            peft's format to ``<log_dir>/best_adapter``.
        predictions_path: where ``predict`` writes JSONL ``{id, dialogue, reference, prediction}``
            (a file given here is replaced); default ``<log_dir>/predictions.jsonl``, then
            ``predictions-2.jsonl`` and so on for later predicts on the run (none replaced).
    """

    def __init__(
        self,
        pretrained: str | None = None,
        shape: str | None = None,
        random_init: bool = False,
        gated: bool = False,
        dropout_rate: float | None = None,
        peft: MethodConfig | None = None,
        quantization: NF4Config | None = None,
        optimizer: str = "adamw",
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_ratio: float = 0.0,
        loraplus_lr_ratio: float | None = None,
        gpu_budget_bytes: int | None = None,
        gradient_checkpointing: bool = False,
        compile: bool = False,
        num_beams: int = 1,
        max_new_tokens: int = 64,
        generate_in_validation: bool = True,
        export_best_adapter: bool = True,
        predictions_path: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.check_settings(
            **{
                key: self.hparams[key]
                for key in inspect.signature(type(self).__init__).parameters
                if key in self.hparams
            }
        )
        # from_pretrained returns a model in eval mode, and Lightning keeps modules' modes: in train
        # mode, dropout is on while training (Lightning switches to eval for validation and back).
        self.model = build_model(pretrained, shape, random_init, gated, dropout_rate).train()
        if quantization is not None:
            peftcore.quantize(self.model, quantization)
        if peft is not None:
            peftcore.inject(self.model, with_tokenizer_path(peft))
        if gradient_checkpointing:
            # Non-reentrant checkpointing lets gradients reach the adapter even when the
            # checkpointed block's inputs (frozen embeddings) do not require grad.
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self._loss = torch.compile(self._model_loss, dynamic=True) if compile else self._model_loss
        self.strict_loading = False  # checkpoints hold only the trainable part
        self.val_rouge, self.test_rouge = Rouge(), Rouge()
        self.best_val_loss = math.inf
        self._predictions: list[dict] = []
        self._step_started = 0.0
        self.first_step_seconds: float | None = None  # of this process's fit
        self.train_runtime = 0.0  # seconds of fit, summed over resumed runs
        self._fit_started: float | None = None

    @classmethod
    def check_settings(cls, **settings: Any) -> None:
        """Every check the constructor makes before it builds anything, for ``settings`` (any of
        its arguments; the rest at their defaults): a sweep checks each value of its space so."""
        given = inspect.signature(cls.__init__).bind(None, **settings)
        given.apply_defaults()
        a = given.arguments
        check_model_source(a["pretrained"], a["shape"], a["random_init"])
        _check_training(
            a["optimizer"],
            a["lr"],
            a["weight_decay"],
            a["betas"],
            a["warmup_ratio"],
            a["loraplus_lr_ratio"],
            a["num_beams"],
            a["max_new_tokens"],
            a["dropout_rate"],
            a["gpu_budget_bytes"],
        )

    # --- reports ------------------------------------------------------------------------------

    def efficiency(self) -> dict[str, float]:
        counts = peftcore.count_parameters(self.model)
        return {
            "all_params": counts.total,
            "trainable_params": counts.trainable,
            "trainable_params_percent": counts.trainable_percent,
            "memory_footprint": peftcore.memory_footprint(self.model) / 2**30,
        }

    def configure_callbacks(self) -> list[L.Callback]:
        """Callbacks that come with this module, whatever the Trainer is given."""
        return [TrainingPlace()]

    def on_train_start(self) -> None:
        self._fit_started = time.perf_counter()

    def _runtime(self) -> float:
        running = time.perf_counter() - self._fit_started if self._fit_started is not None else 0.0
        return self.train_runtime + running

    def on_fit_start(self) -> None:
        stats = self.efficiency()
        rank_zero_info(
            f"{peftcore.count_parameters(self.model)} || memory footprint: {stats['memory_footprint']:.4f} GiB"
        )
        if self.logger is not None:
            self.logger.log_hyperparams(self.hparams, {f"params/{k}": v for k, v in stats.items()})

    # --- steps --------------------------------------------------------------------------------

    def forward(self, batch: dict) -> torch.Tensor:
        return self._loss(batch["input_ids"], batch["attention_mask"], batch["labels"])

    def _model_loss(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss

    def on_train_epoch_start(self) -> None:
        # Lightning seeds the sampler with its count of finished epochs, which is one short when a
        # run resumes from a checkpoint written at an epoch's end: the resumed epoch would replay
        # the previous one's order. current_epoch is right in both cases. (A run resumed inside an
        # epoch continues it without this hook: its loader's load_state_dict places it.)
        set_sampler_epoch(self.trainer.train_dataloader, self.current_epoch)

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        self._step_started = time.perf_counter()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self(batch)
        size = len(batch["ids"])
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        self.log("train/padding_fraction", batch["padding_fraction"], batch_size=size)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: dict, batch_idx: int) -> None:
        tokens = int(batch["attention_mask"].sum()) + int((batch["labels"] != -100).sum())
        elapsed = max(time.perf_counter() - self._step_started, 1e-9)
        if self.first_step_seconds is None:  # it holds the compilation (and lazy initialisation)
            self.first_step_seconds = elapsed
            rank_zero_info(
                f"first training step: {elapsed:.1f} s"
                + (" (compilation included)" if self.hparams.compile else "")
            )
            if self.logger is not None:  # straight to the logger: self.log would wait for log_every_n_steps
                self.logger.log_metrics({"train/first_step_s": elapsed}, step=self.global_step)
        self.log("train/tokens_per_s", tokens / elapsed, batch_size=len(batch["ids"]))
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=len(batch["ids"]))

    def _evaluate(self, batch: dict, stage: str, rouge: Rouge, generate: bool) -> None:
        size = len(batch["ids"])
        self.log(f"{stage}/loss", self(batch), prog_bar=True, batch_size=size, sync_dist=True)
        if generate:
            rouge.update(self.generate_summaries(batch), batch["references"])

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_rouge, self.hparams.generate_in_validation)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_rouge, True)

    def _log_rouge(self, stage: str, rouge: Rouge) -> None:
        if rouge.update_count == 0:
            return
        scores = rouge.compute()
        for key in ROUGE_KEYS:
            self.log(f"{stage}/{key}", scores[key].float(), prog_bar=key == "rougeL", sync_dist=False)
        rouge.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_rouge("val", self.val_rouge)
        loss = self.trainer.callback_metrics.get("val/loss")
        if loss is not None and not self.trainer.sanity_checking and float(loss) < self.best_val_loss:
            self.best_val_loss = float(loss)
            if self.hparams.export_best_adapter and self.hparams.peft is not None:
                self._export_adapter(Path(self._log_dir()) / "best_adapter")

    def on_test_epoch_end(self) -> None:
        self._log_rouge("test", self.test_rouge)

    @torch.no_grad()
    def generate_summaries(self, batch: dict) -> list[str]:
        tokens = self.model.generate(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            num_beams=self.hparams.num_beams,
            max_new_tokens=self.hparams.max_new_tokens,
        )
        return self.tokenizer.batch_decode(tokens, skip_special_tokens=True)

    @property
    def tokenizer(self):
        return self.trainer.datamodule.tokenizer

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        rows = [
            {"id": i, "dialogue": src, "reference": refs[0] if len(refs) == 1 else refs, "prediction": pred}
            for i, src, refs, pred in zip(
                batch["ids"], batch["sources"], batch["references"], self.generate_summaries(batch)
            )
        ]
        self._predictions.extend(rows)
        return rows

    def on_predict_epoch_end(self) -> None:
        path = (
            Path(self.hparams.predictions_path)
            if self.hparams.predictions_path
            else _unused(Path(self._log_dir()))
        )
        if self.trainer.world_size > 1:
            path = path.with_suffix(f".rank{self.global_rank}.jsonl")
        write_atomically(
            path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in self._predictions)
        )
        rank_zero_info(f"wrote {len(self._predictions)} predictions to {path}")
        self._predictions = []

    # --- optimisation -------------------------------------------------------------------------

    def configure_optimizers(self) -> dict:
        groups = param_groups(
            self.model, self.hparams.lr, self.hparams.weight_decay, self.hparams.loraplus_lr_ratio
        )
        if self.hparams.optimizer == "paged_adamw":
            optimizer = peftcore.PagedAdamW(
                groups,
                lr=self.hparams.lr,
                betas=tuple(self.hparams.betas),
                gpu_budget_bytes=self.hparams.gpu_budget_bytes,
            )
        else:
            optimizer = torch.optim.AdamW(
                groups, lr=self.hparams.lr, betas=tuple(self.hparams.betas), **self._adamw_kernel()
            )
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup = int(total * self.hparams.warmup_ratio)

        def linear_warmup_then_decay(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            return max(0.0, (total - step) / max(1, total - warmup))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_warmup_then_decay)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _adamw_kernel(self) -> dict[str, bool]:
        """torch's fused AdamW (one kernel for every tensor, on the CPU and CUDA; what the HF Trainer
        uses by default), except where Lightning refuses it: it does not clip gradients for an
        optimizer that unscales them itself under mixed precision. There the multi-tensor one."""
        clips = bool(self.trainer.gradient_clip_val)
        mixed = str(self.trainer.precision).endswith("-mixed")
        return {"foreach": True} if clips and mixed else {"fused": True}

    # --- checkpoints: the trainable part only -------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        trainable = {f"model.{name}" for name, p in self.model.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        checkpoint["best_val_loss"] = self.best_val_loss
        checkpoint["train_runtime"] = self._runtime()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        expected = {f"model.{name}" for name, p in self.model.named_parameters() if p.requires_grad}
        missing = sorted(expected - checkpoint["state_dict"].keys())
        if missing:
            raise ValueError(
                f"the checkpoint lacks {len(missing)} trainable tensors of this model (first: {missing[0]!r}); "
                "was it written with another peft method, target_modules or model?"
            )
        self.best_val_loss = checkpoint.get("best_val_loss", math.inf)
        self.train_runtime = checkpoint.get("train_runtime", 0.0)

    @rank_zero_only
    def _export_adapter(self, path: Path) -> None:
        if not self.trainer.fast_dev_run:  # fast_dev_run writes nothing, as Lightning promises
            peftcore.save_adapter(self.model, path)

    def _log_dir(self) -> str:
        logger = self.trainer.logger
        return (
            logger.log_dir if logger is not None and logger.log_dir else None
        ) or self.trainer.default_root_dir


def _unused(run_dir: Path) -> Path:
    """``predictions.jsonl`` in the run's directory, or for a later predict on the same run
    ``predictions-2.jsonl``, ``-3``...: one command's output never replaces another's."""
    path, k = run_dir / "predictions.jsonl", 2
    while path.exists():
        path, k = run_dir / f"predictions-{k}.jsonl", k + 1
    return path


# fit --help shows the docstring: the method list in it comes from peftcore.methods.
Seq2SeqFineTuner.__doc__ = Seq2SeqFineTuner.__doc__.replace("{method_fields}", method_fields())

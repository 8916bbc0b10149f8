"""Callbacks the fine-tuning module brings with it (``Seq2SeqFineTuner.configure_callbacks``).

Lightning merges them with the Trainer's own callbacks and runs checkpoint callbacks last, so
whatever these record after a batch or a validation is in place before any checkpoint of that
moment is written. Those that keep state (the best loss, the runtime) save it with checkpoints.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info

import peftcore
from experiments.data import ResumableDataLoader
from peftcore.files import write_atomically
from peftcore.sharding import full_parameters


def run_dir(trainer: L.Trainer) -> Path:
    """The run's directory: its logger's (``runs/<name>/version_N``), else the Trainer's root.
    (``Trainer.log_dir`` says the same but broadcasts, and the writers here run on rank 0 alone.)"""
    logger = trainer.logger
    return Path(
        (logger.log_dir if logger is not None and logger.log_dir else None) or trainer.default_root_dir
    )


class TrainingPlace(L.Callback):
    """Tells a resumable training loader how many batches of the epoch the loop has finished, so
    that a checkpoint written now resumes after exactly those (see ``ResumableDataLoader``), and
    places a resumed run's loader where the data module could not (see ``on_train_start``). A
    batch whose optimizer step ran before an exception (raised by a later callback's
    ``on_train_batch_end``, say) counts as done too: resuming must not train it twice."""

    def __init__(self) -> None:
        self._batch_began: tuple[int, int] | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Under strategies that restore a checkpoint after setup (ModelParallelStrategy: FSDP2),
        # the training loader was made (for the step estimate) before the saved place arrived.
        take = getattr(trainer.datamodule, "take_saved_place", None)
        loader = trainer.train_dataloader
        place = take() if take is not None and isinstance(loader, ResumableDataLoader) else None
        if place is not None:
            loader.load_state_dict(place)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batch_began = (batch_idx, trainer.global_step)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        loader = trainer.train_dataloader
        if self._batch_began is None or not isinstance(loader, ResumableDataLoader):
            return
        batch_idx, step_then = self._batch_began
        if trainer.global_step > step_then:
            loader.batch_done(trainer.current_epoch, batch_idx + 1)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loader = trainer.train_dataloader
        if isinstance(loader, ResumableDataLoader):
            loader.batch_done(trainer.current_epoch, batch_idx + 1)


class StepTimer(L.Callback):
    """Each training step's speed and learning rate (``train/tokens_per_s``, ``train/lr``), the
    first step's seconds (``train/first_step_s``: it holds compilation and lazy initialisation,
    logged at once), and the seconds of fit summed over resumed runs (saved with checkpoints)."""

    def __init__(self, compiled: bool = False) -> None:
        self.compiled = compiled
        self.first_step_seconds: float | None = None  # of this process's fit
        self.train_runtime = 0.0  # seconds of fit before this process's
        self._fit_started: float | None = None
        self._step_started = 0.0

    def runtime(self) -> float:
        """Seconds of fit so far, resumed runs included."""
        running = time.perf_counter() - self._fit_started if self._fit_started is not None else 0.0
        return self.train_runtime + running

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._fit_started = time.perf_counter()

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._step_started = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        tokens = int(batch["attention_mask"].sum()) + int((batch["labels"] != -100).sum())
        elapsed = max(time.perf_counter() - self._step_started, 1e-9)
        if self.first_step_seconds is None:
            self.first_step_seconds = elapsed
            rank_zero_info(
                f"first training step: {elapsed:.1f} s" + (" (compilation included)" if self.compiled else "")
            )
            if (
                trainer.logger is not None
            ):  # straight to the logger: self.log would wait for log_every_n_steps
                trainer.logger.log_metrics({"train/first_step_s": elapsed}, step=trainer.global_step)
        size = len(batch["ids"])
        pl_module.log("train/tokens_per_s", tokens / elapsed, batch_size=size)
        pl_module.log("train/lr", trainer.optimizers[0].param_groups[0]["lr"], batch_size=size)

    def state_dict(self) -> dict[str, float]:
        return {"train_runtime": self.runtime()}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.train_runtime = float(state["train_runtime"])

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # checkpoints written before this callback kept the runtime at their top level
        self.train_runtime = float(checkpoint.get("train_runtime", self.train_runtime))


def recorded_runtime(checkpoint: dict[str, Any]) -> float:
    """The seconds of fit a checkpoint records (its StepTimer's state; older checkpoints: their own key)."""
    state = (checkpoint.get("callbacks") or {}).get(StepTimer.__qualname__) or {}
    return float(state.get("train_runtime", checkpoint.get("train_runtime", 0.0)))


class BestAdapterExport(L.Callback):
    """After each validation of fit with a new best ``val/loss``, saves the adapter in peft's
    format to ``<run dir>/best_adapter`` (on rank 0, whole tensors under FSDP too; nothing under
    ``fast_dev_run``). The best
    loss so far is saved with checkpoints, so a resumed run exports only a real improvement."""

    def __init__(self) -> None:
        self.best_val_loss = math.inf

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        loss = trainer.callback_metrics.get("val/loss")
        if loss is None or not float(loss) < self.best_val_loss:
            return
        self.best_val_loss = float(loss)
        if trainer.fast_dev_run:
            return
        # Sharded (FSDP): every rank gathers the whole tensors, rank 0 writes them.
        with full_parameters(trainer.strategy.model):
            if trainer.is_global_zero:
                peftcore.save_adapter(pl_module.model, run_dir(trainer) / "best_adapter")

    def state_dict(self) -> dict[str, float]:
        return {"best_val_loss": self.best_val_loss}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.best_val_loss = float(state["best_val_loss"])

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # checkpoints written before this callback kept the best loss at their top level
        self.best_val_loss = float(checkpoint.get("best_val_loss", self.best_val_loss))


class PredictionWriter(BasePredictionWriter):
    """Writes what ``predict`` returned as JSONL rows ``{id, dialogue, reference, prediction}``
    once the pass ends: to ``path`` when given (a file there is replaced), else to the run's
    ``predictions.jsonl``, or for a later predict on the same run ``predictions-2.jsonl``,
    ``-3``...: one command's output never replaces another's. Under DDP each rank writes its
    own file (``<name>.rank<k>.jsonl``)."""

    def __init__(self, path: str | None = None) -> None:
        super().__init__(write_interval="epoch")
        self.path = path
        self.written: Path | None = None

    def write_on_epoch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        predictions: list[Any],
        batch_indices: list[Any],
    ) -> None:
        rows = [row for batch in predictions for row in batch]
        path = Path(self.path) if self.path else _unused(run_dir(trainer))
        if trainer.world_size > 1:
            path = path.with_suffix(f".rank{trainer.global_rank}.jsonl")
        write_atomically(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        rank_zero_info(f"wrote {len(rows)} predictions to {path}")
        self.written = path


def _unused(run: Path) -> Path:
    path, k = run / "predictions.jsonl", 2
    while path.exists():
        path, k = run / f"predictions-{k}.jsonl", k + 1
    return path

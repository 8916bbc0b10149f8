"""Callbacks the fine-tuning module brings with it (``Seq2SeqFineTuner.configure_callbacks``).

Lightning merges them with the Trainer's own callbacks and runs checkpoint callbacks last, so
whatever these record after a batch is in place before any checkpoint of that batch is written.
"""

from __future__ import annotations

from typing import Any

import lightning as L

from experiments.data import ResumableDataLoader


class TrainingPlace(L.Callback):
    """Tells a resumable training loader how many batches of the epoch the loop has finished, so
    that a checkpoint written now resumes after exactly those (see ``ResumableDataLoader``)."""

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loader = trainer.train_dataloader
        if isinstance(loader, ResumableDataLoader):
            loader.batch_done(trainer.current_epoch, batch_idx + 1)

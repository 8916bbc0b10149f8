"""A callback for the 2-process DDP test: each rank writes which samplers Lightning gave its
training loader and the example ids it trained on (runs in the subprocess, not collected)."""

import json
import os
from pathlib import Path

from lightning.pytorch.callbacks import Callback


class RankRecorder(Callback):
    def __init__(self) -> None:
        self.ids: list[str] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.ids += batch["ids"]

    def on_train_end(self, trainer, module):
        loader = trainer.train_dataloader
        record = {
            "batch_sampler": type(loader.batch_sampler).__name__,
            "sampler": type(loader.batch_sampler.sampler).__name__,
            "ids": self.ids,
        }
        Path(os.getcwd(), f"rank{trainer.global_rank}.json").write_text(json.dumps(record))

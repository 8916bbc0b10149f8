"""Callbacks for the 2-process DDP and FSDP2 tests (they run in the subprocesses, not collected)."""

import json
import os
from pathlib import Path

from lightning.pytorch.callbacks import Callback


class RankRecorder(Callback):
    """Each rank writes which samplers Lightning gave its training loader and the ids it trained on."""

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


class ShardRecorder(Callback):
    """For the FSDP2 tests: each rank writes the counts its module reports and the bytes of the
    4-bit storage it holds itself (its slices) and in all (the whole base)."""

    def on_train_start(self, trainer, module):
        from torch.distributed.tensor import DTensor

        local = whole = 0
        for name, tensor in [*module.model.named_parameters(), *module.model.named_buffers()]:
            if name.endswith(("weight_packed", "absmax")):
                part = tensor.to_local() if isinstance(tensor, DTensor) else tensor
                local += part.numel() * part.element_size()
                whole += tensor.numel() * tensor.element_size()
        record = {"efficiency": module.efficiency(), "storage_local": local, "storage_whole": whole}
        Path(os.getcwd(), f"shards{trainer.global_rank}.json").write_text(json.dumps(record))


class StopAtStep(Callback):
    """Raises on every rank once ``step`` optimizer steps are done (RunCheckpoint saves last.ckpt)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError(f"stopped at step {self.step} by the test")

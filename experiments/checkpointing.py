"""RunCheckpoint: Lightning's ModelCheckpoint, made to lose no work and to touch no other run.

- Files go to the run's own version directory, ``<save_dir>/<name>/version_N/checkpoints/``,
  next to its TensorBoard events, ``config*.yaml`` and ``best_adapter/`` (leave ``dirpath``
  unset). An explicit ``dirpath`` that already holds another run's checkpoints is refused.
- Every file is written under a temporary name and renamed into place: a crash never leaves a
  half-written checkpoint, and the previous one stays until the new one is complete.
- ``fast_dev_run`` writes nothing (Lightning's own callback still writes ``last.ckpt`` then).
- ``last.ckpt`` is also written every ``save_every_n_steps`` optimizer steps, on Ctrl-C and when
  fit fails with an exception, always at an optimizer-step boundary, so that resuming
  (``--ckpt_path last``) continues with the very losses an uninterrupted run would have had.
  The first Ctrl-C lets the step in flight finish, saves, and stops (exit status 1); a second
  one stops at once without saving.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any, Optional

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info

from peftcore.files import write_atomically


class RunCheckpoint(ModelCheckpoint):
    """ModelCheckpoint (every argument of Lightning's) that belongs to its run and loses no work.

    Args:
        save_every_n_steps: also write ``last.ckpt`` every this many optimizer steps (0: never).
    """

    def __init__(self, *args: Any, save_every_n_steps: int = 0, **kwargs: Any) -> None:
        kwargs.setdefault("save_last", True)
        super().__init__(*args, **kwargs)
        if save_every_n_steps < 0:
            raise ValueError(f"save_every_n_steps must be >= 0, got {save_every_n_steps}")
        self.save_every_n_steps = save_every_n_steps
        self._stop_requested = False
        self._previous_handler: Any = None
        self._resuming_from: Optional[str] = None

    # --- where, and never over another run ----------------------------------------------------

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        explicit = self.dirpath is not None
        super().setup(trainer, pl_module, stage)
        if stage != "fit" or not explicit or trainer.fast_dev_run or not trainer.is_global_zero:
            return
        resuming = trainer.ckpt_path is not None and Path(trainer.ckpt_path).resolve().parent == Path(self.dirpath).resolve()
        existing = sorted(p.name for p in Path(self.dirpath).glob("*.ckpt")) if Path(self.dirpath).is_dir() else []
        if existing and not resuming:
            raise ValueError(
                f"{self.dirpath} already holds checkpoints of another run ({', '.join(existing)}); this run would "
                "overwrite them. Leave ModelCheckpoint's dirpath unset (each run then writes into its own "
                "<save_dir>/<name>/version_N/checkpoints), or resume that run with --ckpt_path"
            )

    # --- atomic, and nothing under fast_dev_run -----------------------------------------------

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        if trainer.fast_dev_run:
            return
        save = super()._save_checkpoint
        if trainer.is_global_zero:
            write_atomically(filepath, lambda tmp: save(trainer, tmp))
        else:
            save(trainer, filepath)  # writes nothing off rank 0; takes part in any collective of the save
        self._last_checkpoint_saved = filepath

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.fast_dev_run:
            super().on_train_end(trainer, pl_module)

    # --- every n steps, on Ctrl-C, on an exception --------------------------------------------

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            self._previous_handler = signal.signal(signal.SIGINT, self._request_stop)

    def _request_stop(self, signum: int, frame: Any) -> None:
        self._stop_requested = True
        signal.signal(signal.SIGINT, self._previous_handler or signal.default_int_handler)
        rank_zero_info("\nCtrl-C: finishing this step, then saving last.ckpt (Ctrl-C again stops at once, unsaved)")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if not _at_step_boundary(trainer, done=batch_idx + 1):
            return
        due = self.save_every_n_steps and trainer.global_step % self.save_every_n_steps == 0
        if (due or self._stop_requested) and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        if self._stop_requested:
            rank_zero_info(f"saved {self.last_model_path} at step {trainer.global_step}; resume with --ckpt_path last")
            raise KeyboardInterrupt

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore_handler()
        if isinstance(exception, KeyboardInterrupt) or trainer.fast_dev_run or trainer.sanity_checking:
            return  # a graceful stop saved already; a second Ctrl-C may have come mid-step
        if self._last_global_step_saved == trainer.global_step:
            return
        if not _at_step_boundary(trainer, done=trainer.fit_loop.epoch_loop.batch_progress.current.processed):
            rank_zero_info(
                f"{type(exception).__name__} in the middle of a gradient accumulation: its partial gradients cannot be "
                f"saved, so the last checkpoint ({self.last_model_path or 'none'}) is kept"
            )
            return
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        rank_zero_info(f"{type(exception).__name__}: saved {self.last_model_path} at step {trainer.global_step}")

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore_handler()

    def _restore_handler(self) -> None:
        if self._previous_handler is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._previous_handler)
            self._previous_handler = None


def _at_step_boundary(trainer: L.Trainer, done: int) -> bool:
    """Whether the optimizer has stepped over all ``done`` batches of this epoch, so a checkpoint
    now resumes exactly (gradients accumulated towards the next step are not saved; a batch that
    raised before completing is redone on resume)."""
    accumulate = trainer.accumulate_grad_batches
    return accumulate == 1 or done % accumulate == 0 or done == trainer.num_training_batches

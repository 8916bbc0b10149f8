"""RunCheckpoint: Lightning's ModelCheckpoint, made to lose no work and to touch no other run.

- Files go to the run's own version directory, ``<save_dir>/<name>/version_N/checkpoints/``,
  next to its TensorBoard events, ``config*.yaml`` and ``best_adapter/`` (leave ``dirpath``
  unset). An explicit ``dirpath`` that already holds another run's checkpoints is refused.
- ``best.ckpt`` (or whatever ``filename`` says) is Lightning's top-k save at each validation;
  ``last.ckpt`` is this callback's own, always written: after every validation, every
  ``save_every_n_steps`` optimizer steps, at the end of each epoch and of training, on Ctrl-C
  and when fit fails with an exception, always at an optimizer-step boundary, so that resuming
  (``--ckpt_path last``) continues with the very losses an uninterrupted run would have had.
  Its own saves never mark a step as saved for Lightning, so a periodic save that lands on a
  validation step cannot cost the top-k save (Lightning skips a step it has saved already).
  The last.ckpt it replaces is kept as ``previous.ckpt``, a fallback should last.ckpt be damaged.
- Every file is written by :class:`LocalCheckpointIO`: a temporary file beside the target,
  flushed to disk, then renamed into place (Lightning's own writer stages it in ``$TMPDIR``).
  A crash never leaves a half-written checkpoint; stray temporaries of a killed run are removed
  when the run starts again.
- The first Ctrl-C lets the step in flight finish, saves, and stops (exit status 1); a second
  one stops at once without saving. ``fast_dev_run`` writes nothing.
- :func:`read_checkpoint` loads a checkpoint with ``weights_only=True`` and says plainly when a
  file is damaged or foreign, naming the run's other checkpoints to use instead.
"""

from __future__ import annotations

import os
import pickle
import shutil
import signal
import struct
import threading
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fsspec.utils
import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info

from peftcore.files import remove_stale_temporaries, write_atomically

LAST, PREVIOUS = "last.ckpt", "previous.ckpt"


class DamagedCheckpoint(ValueError):
    """A checkpoint file that cannot be read: truncated, empty, overwritten, or not a checkpoint."""


def read_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """``torch.load(path, weights_only=True)``, with an error that names the file, says it is
    damaged and lists the run's other checkpoints, instead of a zip or unpickling traceback
    (and never the advice to unpickle arbitrary code with ``weights_only=False``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except (  # what torch's unpickler raises on garbage varies with the bytes (random ones: any of these)
        EOFError,
        RuntimeError,
        OSError,
        ValueError,
        KeyError,
        IndexError,
        TypeError,
        AttributeError,
        struct.error,
        zipfile.BadZipFile,
        pickle.UnpicklingError,
    ) as err:
        reason = _why_unreadable(path, err)
        raise DamagedCheckpoint(
            f"{path} is damaged or not a checkpoint of this project ({reason}). {_alternatives(path)}"
        ) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise DamagedCheckpoint(
            f"{path} is not a Lightning checkpoint (no state_dict in it). {_alternatives(path)}"
        )
    return checkpoint


def _why_unreadable(path: Path, err: BaseException) -> str:
    if path.stat().st_size == 0:
        return "it is empty"
    if isinstance(err, pickle.UnpicklingError):  # torch's own text would advise weights_only=False: never
        return "it holds something other than tensors and plain data: overwritten, or not a checkpoint"
    first = (str(err).splitlines() or [type(err).__name__])[0][:200]
    return f"it is cut short or overwritten; torch.load says: {first}"


def _alternatives(damaged: Path) -> str:
    others = sorted(p for p in damaged.parent.glob("*.ckpt") if p != damaged and p.stat().st_size > 0)
    if not others:
        return "The run has no other checkpoint: start the run again."
    listed = ", ".join(str(p) for p in others)
    return f"Give one of the run's other checkpoints to --ckpt_path instead: {listed}."


class LocalCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint into a temporary file beside its target, syncs it and renames it into
    place (peftcore.files.write_atomically); reads with :func:`read_checkpoint`. Remote paths
    (s3://, gs://, ...) go to Lightning's own writer."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or not _is_local(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        try:
            write_atomically(path, lambda tmp: torch.save(checkpoint, tmp))
        except OSError as err:  # torch's message names no file; the previous one is still in place
            kept = f"; the previous {Path(path).name} is kept" if Path(path).exists() else ""
            raise OSError(
                err.errno, f"could not write the checkpoint {path}: {err.strerror or err}{kept}"
            ) from err

    def load_checkpoint(
        self,
        path: Any,
        map_location: Callable | None = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        if not _is_local(path) or weights_only is False:
            return super().load_checkpoint(path, map_location, weights_only)
        return read_checkpoint(path, map_location)


class RunCheckpoint(ModelCheckpoint):
    """ModelCheckpoint (every argument of Lightning's) that belongs to its run and loses no work.

    Args:
        save_every_n_steps: also write ``last.ckpt`` every this many optimizer steps (0: never).
    """

    def __init__(self, *args: Any, save_every_n_steps: int = 0, **kwargs: Any) -> None:
        save_last = kwargs.pop("save_last", None)
        if save_last not in (None, True):
            raise ValueError(
                f"RunCheckpoint always writes last.ckpt (what --ckpt_path last resumes); save_last={save_last!r} "
                "is refused: leave save_last unset or true"
            )
        if save_every_n_steps < 0:
            raise ValueError(f"save_every_n_steps must be >= 0, got {save_every_n_steps}")
        # Lightning's own save_last is off: this callback writes last.ckpt itself (see the module docstring).
        super().__init__(*args, save_last=False, **kwargs)
        self.save_every_n_steps = save_every_n_steps
        self._last_written_step: int | None = None
        self._stop_requested = False
        self._previous_handler: Any = None
        self._batches_done = 0  # batches of the current epoch the training loop has finished
        self._batch_began: tuple[int, int] | None = None  # (batch_idx, global_step) of the batch in flight

    # --- where, and never over another run ----------------------------------------------------

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        explicit = self.dirpath is not None
        super().setup(trainer, pl_module, stage)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # a plugin the user chose stays
            trainer.strategy.checkpoint_io = LocalCheckpointIO()
        if stage != "fit" or trainer.fast_dev_run or not trainer.is_global_zero:
            return
        directory = Path(self.dirpath)
        names = {
            LAST,
            PREVIOUS,
            *(p.name for p in directory.glob("*.ckpt")),
            f"{self.filename or 'best'}.ckpt",
        }
        for stray in (stray for name in sorted(names) for stray in remove_stale_temporaries(directory, name)):
            rank_zero_info(f"removed {stray}, a temporary file left by an interrupted save")
        if not explicit:
            return
        resuming = (
            trainer.ckpt_path is not None and Path(trainer.ckpt_path).resolve().parent == directory.resolve()
        )
        existing = sorted(p.name for p in directory.glob("*.ckpt")) if directory.is_dir() else []
        if existing and not resuming:
            raise ValueError(
                f"{self.dirpath} already holds checkpoints of another run ({', '.join(existing)}); this run would "
                "overwrite them. Leave ModelCheckpoint's dirpath unset (each run then writes into its own "
                "<save_dir>/<name>/version_N/checkpoints), or resume that run with --ckpt_path"
            )

    # --- last.ckpt: written by this callback alone ---------------------------------------------

    def _write_last(self, trainer: L.Trainer) -> None:
        """Write ``last.ckpt`` now (every rank takes part; rank 0 writes), keeping the one it
        replaces as ``previous.ckpt`` when that holds another step."""
        if trainer.fast_dev_run or trainer.sanity_checking:
            return
        path = Path(self.dirpath) / LAST
        if trainer.is_global_zero and path.is_file() and self._last_written_step != trainer.global_step:
            _keep_as(path, path.with_name(PREVIOUS))
        self.last_model_path = str(path)  # set first: it is part of the state being saved
        trainer.save_checkpoint(str(path), self.save_weights_only)
        self._last_written_step = trainer.global_step

    def _due(self, trainer: L.Trainer) -> bool:
        """Whether last.ckpt lacks this step (a second save of one step writes nothing new)."""
        return self._last_written_step != trainer.global_step

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)  # the top-k save (best.ckpt)
        if not trainer.sanity_checking and trainer.state.fn == "fit":
            self._write_last(trainer)  # after it, so that last.ckpt knows the new best

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._due(trainer):
            self._write_last(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._due(trainer):
            self._write_last(trainer)

    # --- every n steps, on Ctrl-C, on an exception --------------------------------------------

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            self._previous_handler = signal.signal(signal.SIGINT, self._request_stop)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._batches_done = 0

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batch_began = (batch_idx, trainer.global_step)

    def _request_stop(self, signum: int, frame: Any) -> None:
        self._stop_requested = True
        signal.signal(signal.SIGINT, self._previous_handler or signal.default_int_handler)
        rank_zero_info(
            "\nCtrl-C: finishing this step, then saving last.ckpt (Ctrl-C again stops at once, unsaved)"
        )

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self._batches_done = batch_idx + 1  # of this epoch (a resumed epoch counts from its start)
        if not _at_step_boundary(trainer, done=batch_idx + 1):
            return
        due = self.save_every_n_steps and trainer.global_step % self.save_every_n_steps == 0
        if due or self._stop_requested:
            self._write_last(trainer)
        if self._stop_requested:
            rank_zero_info(
                f"saved {self.last_model_path} at step {trainer.global_step}; resume with --ckpt_path last"
            )
            raise KeyboardInterrupt

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._restore_handler()
        if isinstance(exception, KeyboardInterrupt) or trainer.fast_dev_run or trainer.sanity_checking:
            return  # a graceful stop saved already; a second Ctrl-C may have come mid-step
        if not self._due(trainer):
            return
        # A batch whose optimizer step ran before the exception (raised by a callback's
        # on_train_batch_end, say) is done: the checkpoint must say so, or resuming trains it twice.
        done = stepped_batches(self._batch_began, trainer.global_step, self._batches_done)
        if not _at_step_boundary(trainer, done=done):
            rank_zero_info(
                f"{type(exception).__name__} in the middle of a gradient accumulation: its partial gradients cannot be "
                f"saved, so the last checkpoint ({self.last_model_path or 'none'}) is kept"
            )
            return
        self._write_last(trainer)
        rank_zero_info(
            f"{type(exception).__name__}: saved {self.last_model_path} at step {trainer.global_step}"
        )

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore_handler()

    def _restore_handler(self) -> None:
        if self._previous_handler is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._previous_handler)
            self._previous_handler = None


def stepped_batches(batch_began: tuple[int, int] | None, global_step: int, finished: int) -> int:
    """Batches of this epoch done when an exception stopped fit: those the loop finished, and the
    batch in flight too if its optimizer step ran (``global_step`` moved since it began)."""
    if batch_began is not None and global_step > batch_began[1]:
        return max(finished, batch_began[0] + 1)
    return finished


def _is_local(path: Any) -> bool:
    return fsspec.utils.get_protocol(str(path)) in ("file", "local")


def _keep_as(path: Path, kept: Path) -> None:
    """Make ``kept`` a second name for the file at ``path`` (a hard link, renamed into place, so
    ``kept`` is never half there); a copy where the file system has no hard links."""
    tmp = kept.with_name(f".{kept.name}.link.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(path, tmp)
    except OSError:
        shutil.copyfile(path, tmp)
    os.replace(tmp, kept)


def _at_step_boundary(trainer: L.Trainer, done: int) -> bool:
    """Whether the optimizer has stepped over all ``done`` batches of this epoch, so a checkpoint
    now resumes exactly (gradients accumulated towards the next step are not saved; a batch that
    raised before completing is redone on resume)."""
    accumulate = trainer.accumulate_grad_batches
    return accumulate == 1 or done % accumulate == 0 or done == trainer.num_training_batches

"""The training order: a per-epoch shuffle, length-grouped batches, and a training loader that
knows where it is inside an epoch, so that a run resumed from a checkpoint written mid-epoch
starts after the batches it already trained on (Lightning's stateful-loader interface)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import BatchSampler, DataLoader, Sampler


class EpochShuffle(Sampler[int]):
    """A random permutation of ``range(size)`` that depends only on ``seed + epoch``.

    Args:
        size: Number of examples.
        seed: Base seed; ``set_epoch`` moves to another permutation.
        epoch: The epoch whose permutation the first pass takes.
        skip: Indices the first pass leaves out at its start (a run resumed inside an epoch).
    """

    def __init__(self, size: int, seed: int = 0, epoch: int = 0, skip: int = 0) -> None:
        self.size, self.seed, self.epoch = size, seed, epoch
        self.skip = skip

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        skip, self.skip = self.skip, 0
        return iter(torch.randperm(self.size, generator=generator).tolist()[skip:])

    def __len__(self) -> int:
        return self.size


class LengthGroupedBatchSampler(BatchSampler):
    """Batches of similar length, in random order: less padding than random batches.

    Takes this epoch's indices in random order from ``sampler``, cuts them into buckets of
    ``bucket_batches * batch_size``, sorts each bucket by length, cuts it into batches, and
    shuffles the order of all batches (seed + the sampler's epoch).

    Under DDP, ``sampler`` is a ``DistributedSampler`` and each rank groups its own shard.
    Lightning (``use_distributed_sampler=True``, the default) builds one and re-creates this
    class with it as ``sampler``; it also calls ``set_epoch`` on ``batch_sampler.sampler``
    each epoch, which is why the batch order reads the epoch from ``sampler``.

    Args:
        sampler: Yields this epoch's (and this rank's) indices in random order.
        batch_size: Examples per batch.
        drop_last: Drop the one batch that may be short.
        lengths: Length of each example (indexed like the data set).
        bucket_batches: Batches per bucket: larger groups tighter, smaller keeps more randomness.
        seed: Seed of the batch order.
        skip: Batches the first pass leaves out at its start (a run resumed inside an epoch). An
            argument, not only an attribute, so that Lightning's re-creation of this class under
            DDP keeps it.
    """

    def __init__(
        self,
        sampler: Sampler[int] | Sequence[int],
        batch_size: int,
        drop_last: bool,
        lengths: Sequence[int],
        bucket_batches: int = 50,
        seed: int = 0,
        skip: int = 0,
    ) -> None:
        super().__init__(sampler, batch_size, drop_last)
        self.lengths, self.bucket_batches, self.seed = lengths, bucket_batches, seed
        self.skip = skip

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[list[int]]:
        indices = list(self.sampler)
        bucket = (
            self.bucket_batches * self.batch_size
        )  # a multiple of batch_size: only the last batch is short
        batches = []
        for start in range(0, len(indices), bucket):
            chunk = sorted(indices[start : start + bucket], key=self.lengths.__getitem__)
            batches += [chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        generator = torch.Generator().manual_seed(self.seed + getattr(self.sampler, "epoch", 0))
        skip, self.skip = self.skip, 0
        yield from (batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()[skip:])


def skip_batches(dataloader: DataLoader, batches: int) -> None:
    """Make the next pass over a training loader start after its first ``batches`` batches.

    A run resumed from a checkpoint written mid-epoch: Lightning restarts the loader at the
    epoch's beginning and counts the batches already done, so without this the resumed epoch
    would train on its first batches again instead of the ones that were still to come.
    Under gradient accumulation a checkpoint is only written at an optimizer step, so the
    skipped batches are whole steps.
    """
    if batches <= 0:
        return
    if isinstance(dataloader.batch_sampler, LengthGroupedBatchSampler):
        dataloader.batch_sampler.skip = batches
    elif isinstance(dataloader.sampler, EpochShuffle):
        dataloader.sampler.skip = batches * dataloader.batch_size
    else:
        raise ValueError(
            f"cannot resume mid-epoch with a {type(dataloader.sampler).__name__}: it cannot start after the "
            f"{batches} batches already done. Resume from an epoch-end checkpoint, or use group_by_length: true"
        )


def set_sampler_epoch(dataloader: DataLoader, epoch: int) -> None:
    """Put the loader's shuffle (its sampler, or its batch sampler's) on ``epoch``'s order."""
    for sampler in (dataloader.sampler, getattr(dataloader.batch_sampler, "sampler", None)):
        if callable(getattr(sampler, "set_epoch", None)):
            sampler.set_epoch(epoch)


class ResumableDataLoader(DataLoader):
    """A training DataLoader that knows how far the training loop got in the current epoch.

    The place is what the loop has finished, reported after each batch by the `TrainingPlace`
    callback (a loader cannot count it itself: Lightning fetches batches ahead of the step).
    The data module saves it with each checkpoint and builds the resumed run's loader to start
    after those batches. The loader also offers Lightning's interface for resumable loaders
    (``state_dict``/``load_state_dict``): Lightning then takes the loader as resumable, and
    where it hands a saved place back itself, the loader positions itself the same way.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.place = {"epoch": 0, "batches_done": 0}

    def batch_done(self, epoch: int, batches_done: int) -> None:
        """The training loop has finished ``batches_done`` batches of ``epoch``."""
        self.place = {"epoch": epoch, "batches_done": batches_done}

    def state_dict(self) -> dict[str, int]:
        return dict(self.place)

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.place = {"epoch": int(state["epoch"]), "batches_done": int(state["batches_done"])}
        if 0 < self.place["batches_done"] < len(self):
            set_sampler_epoch(self, self.place["epoch"])
            skip_batches(self, self.place["batches_done"])

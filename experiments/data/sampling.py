"""The training order: a per-epoch shuffle, length-grouped batches, and starting an epoch after
the batches a resumed run already trained on."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import BatchSampler, DataLoader, Sampler


class EpochShuffle(Sampler[int]):
    """A random permutation of ``range(size)`` that depends only on ``seed + epoch``.

    Args:
        size: Number of examples.
        seed: Base seed; ``set_epoch`` moves to another permutation.
    """

    def __init__(self, size: int, seed: int = 0) -> None:
        self.size, self.seed, self.epoch = size, seed, 0
        self.skip = 0  # indices the next pass leaves out at its start (see skip_batches)

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
    """

    def __init__(
        self,
        sampler: Sampler[int] | Sequence[int],
        batch_size: int,
        drop_last: bool,
        lengths: Sequence[int],
        bucket_batches: int = 50,
        seed: int = 0,
    ) -> None:
        super().__init__(sampler, batch_size, drop_last)
        self.lengths, self.bucket_batches, self.seed = lengths, bucket_batches, seed
        self.skip = 0  # batches the next pass leaves out at its start (see skip_batches)

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

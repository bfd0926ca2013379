"""Length-grouped batching: batches of rows of similar length, so dynamic padding pads little."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import BatchSampler, Sampler


class LengthGroupedBatchSampler(BatchSampler):
    """Batches of similar lengths, in a shuffled order (the ``group_by_length`` of HF's Trainer).

    The row order comes from ``sampler`` (a seeded ``RandomSampler``; under DDP Lightning
    re-creates this batch sampler around a ``DistributedSampler``, so each process groups its
    own shard). That order is cut into mega-batches of ``group_size * batch_size`` rows; each
    mega-batch is sorted by length (longest first) and cut into batches; the order of all
    batches is then shuffled with a generator seeded by ``seed`` plus the epoch count, so
    batch composition and order change every epoch but are reproducible.

    Args:
        sampler: the source of row indices.
        batch_size: rows per batch.
        drop_last: drop incomplete batches.
        lengths: the token length of every row of the data set.
        group_size: batches per mega-batch; larger groups pad less but shuffle less.
        seed: seed of the batch-order shuffle.
    """

    def __init__(
        self,
        sampler: Sampler[int] | Sequence[int],
        batch_size: int,
        drop_last: bool,
        lengths: Sequence[int],
        group_size: int = 50,
        seed: int = 0,
    ) -> None:
        super().__init__(sampler, batch_size, drop_last)
        if group_size < 1:
            raise ValueError(f"group_size must be at least 1, got {group_size}")
        self.lengths = lengths
        self.group_size = group_size
        self.seed = seed
        self.epoch = 0

    def __iter__(self) -> Iterator[list[int]]:
        indices = list(self.sampler)
        span = self.batch_size * self.group_size
        batches: list[list[int]] = []
        for start in range(0, len(indices), span):
            group = sorted(indices[start : start + span], key=lambda i: self.lengths[i], reverse=True)
            batches.extend(group[i : i + self.batch_size] for i in range(0, len(group), self.batch_size))
        if self.drop_last:
            batches = [batch for batch in batches if len(batch) == self.batch_size]
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        self.epoch += 1
        for position in torch.randperm(len(batches), generator=generator).tolist():
            yield batches[position]

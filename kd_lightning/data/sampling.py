"""Training batches that resume exactly mid-epoch, and length-grouped batching.

- :class:`EpochRandomSampler`: a row order that is a function of ``(seed, epoch)`` alone.
- :class:`ResumableBatchSampler`: batches of such an order that can start at any batch.
- :class:`ResumableDataLoader`: a DataLoader whose position in the epoch goes into Lightning's
  checkpoints, so a run resumed mid-epoch reads exactly the batches an uninterrupted run reads
  next, in the same order.
- :class:`LengthGroupedBatchSampler`: batches of rows of similar length, so dynamic padding
  pads little; resumable as well.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence, Sized
from typing import Any

import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, Sampler


class EpochRandomSampler(RandomSampler):
    """Every row once per epoch, in the order ``torch.randperm`` draws from a generator seeded
    with ``seed + epoch`` (as :class:`~torch.utils.data.DistributedSampler` does on one process).

    The order depends on nothing else (not on the global generators, not on how many
    iterators were made before), so a resumed run recomputes any epoch's order from the two
    numbers. Lightning calls :meth:`set_epoch` at the start of every training epoch; outside
    Lightning call it yourself. A ``RandomSampler`` subclass, so Lightning knows the loader is
    shuffled (under DDP it replaces it with a ``DistributedSampler``, seeded and set the same way).

    Args:
        data_source: the data set (only its length is used).
        seed: seed of the order.
    """

    def __init__(self, data_source: Sized, seed: int = 0) -> None:
        super().__init__(data_source)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Use the order of ``epoch`` from the next iteration on."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        yield from torch.randperm(len(self.data_source), generator=generator).tolist()


class ResumableBatchSampler(BatchSampler):
    """Batches of ``batch_size`` rows taken in ``sampler``'s order, with an epoch that can be
    entered at any batch.

    :meth:`epoch_batches` lists an epoch's batches; iterating yields them from the batch given
    to :meth:`start_next_iteration_at` (once: for the next iterator that starts drawing; later
    ones start at the first batch again). Skipping happens on indices, so no skipped row is
    loaded or collated. The batches of an epoch must be a function of its number, which holds
    for a seeded sampler with ``set_epoch`` (:class:`EpochRandomSampler`,
    ``DistributedSampler``) or a sequential one.

    Args:
        sampler: the source of row indices; its ``epoch`` attribute, where it has one, is the
            epoch (Lightning calls ``set_epoch`` on a batch sampler's ``sampler``).
        batch_size: rows per batch.
        drop_last: drop an incomplete last batch.
    """

    def __init__(self, sampler: Sampler[int] | Sequence[int], batch_size: int, drop_last: bool) -> None:
        super().__init__(sampler, batch_size, drop_last)
        self._epoch = 0
        self._start = 0

    @property
    def epoch(self) -> int:
        """The epoch being (or about to be) iterated: the sampler's, else the last :meth:`set_epoch`."""
        return int(getattr(self.sampler, "epoch", self._epoch))

    def set_epoch(self, epoch: int) -> None:
        """Iterate ``epoch`` next (passed on to the sampler where it has ``set_epoch``)."""
        self._epoch = epoch
        set_sampler_epoch = getattr(self.sampler, "set_epoch", None)
        if callable(set_sampler_epoch):
            set_sampler_epoch(epoch)

    def start_next_iteration_at(self, batch: int) -> None:
        """Make the next iteration start at batch number ``batch`` of the epoch (0: the first)."""
        if batch < 0:
            raise ValueError(f"a batch number is at least 0, got {batch}")
        self._start = batch

    def epoch_batches(self) -> Iterator[list[int]]:
        """All batches of the current epoch, in order."""
        return super().__iter__()

    def __iter__(self) -> Iterator[list[int]]:
        # a generator: the start is taken when drawing begins, not when the iterator is made
        # (a DataLoader with workers makes one iterator that it drops, then the one it draws from)
        start, self._start = self._start, 0
        yield from itertools.islice(self.epoch_batches(), start, None)


class ResumableDataLoader(DataLoader):
    """A training DataLoader that resumes mid-epoch at the batch where a checkpoint was taken.

    Give it a :class:`ResumableBatchSampler` (``batch_sampler=``). It counts the batches it
    hands out in each epoch, and implements the ``state_dict``/``load_state_dict`` protocol
    that Lightning's fit loop looks for on training loaders: the position (epoch, batches
    handed out) goes into every checkpoint (``loops.fit_loop.state_dict.combined_loader``) and
    is loaded back when a run resumes from it. The next iteration over that same epoch then
    starts at the following batch; had the checkpoint finished its epoch, Lightning sets the
    next epoch and the position no longer applies. The batches are counted where they leave
    the loader, so batches that worker processes have prefetched but training has not taken
    are not counted.

    Iteration starts lazily, at the first batch requested. Lightning makes a resumed run's
    training iterator before it calls ``set_epoch`` for the epoch it resumes into; starting
    later means the sampler draws (and workers prefetch) that epoch's batches, not the
    previous epoch's. The order itself must come out the same after a resume, so the
    sampler's seeds must be those of the interrupted run (:class:`EpochRandomSampler` with the
    same seed; ``TextClassificationDataModule`` keeps its seed in the checkpoint), and its
    epoch the trainer's (:class:`~kd_lightning.checkpointing.TrainingEpochSync` corrects the
    epoch Lightning sets after a resume from an end-of-epoch checkpoint).
    """

    _position: tuple[int, int] = (0, 0)  # (epoch, batches of it handed out)
    _resume_from: tuple[int, int] | None = None

    def __iter__(self) -> Iterator[Any]:
        if not isinstance(self.batch_sampler, ResumableBatchSampler):
            raise TypeError(
                f"ResumableDataLoader needs a ResumableBatchSampler as batch_sampler, got {type(self.batch_sampler).__name__}"
            )
        return self._batches(self.batch_sampler)

    def _batches(self, batches: ResumableBatchSampler) -> Iterator[Any]:
        epoch, start = batches.epoch, 0
        if self._resume_from is not None:
            resume_epoch, resume_batch = self._resume_from
            self._resume_from = None
            start = resume_batch if resume_epoch == epoch else 0
        batches.start_next_iteration_at(start)
        self._position = (epoch, start)
        for batch in super().__iter__():
            self._position = (epoch, self._position[1] + 1)
            yield batch

    def state_dict(self) -> dict[str, int]:
        """The epoch and how many of its batches this loader has handed out."""
        epoch, batches = self._position
        return {"epoch": epoch, "batches": batches}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Start the next iteration over epoch ``state_dict["epoch"]`` after its first
        ``state_dict["batches"]`` batches."""
        self._resume_from = (int(state_dict["epoch"]), int(state_dict["batches"]))
        self._position = self._resume_from


class LengthGroupedBatchSampler(ResumableBatchSampler):
    """Batches of similar lengths, in a shuffled order (the ``group_by_length`` of HF's Trainer).

    The row order comes from ``sampler`` (an :class:`EpochRandomSampler`; under DDP Lightning
    re-creates this batch sampler around a ``DistributedSampler``, so each process groups its
    own shard). That order is cut into mega-batches of ``group_size * batch_size`` rows; each
    mega-batch is sorted by length (longest first) and cut into batches; the order of all
    batches is then shuffled with a generator seeded by ``seed`` plus the epoch number, so
    batch composition and order change every epoch but are reproducible, and a resumed run
    continues an epoch with exactly its remaining batches (see :class:`ResumableBatchSampler`).
    The epoch is the sampler's (which Lightning sets every epoch), else the last
    :meth:`set_epoch`.

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

    def epoch_batches(self) -> Iterator[list[int]]:
        indices = list(self.sampler)
        span = self.batch_size * self.group_size
        batches: list[list[int]] = []
        for start in range(0, len(indices), span):
            group = sorted(indices[start : start + span], key=lambda i: self.lengths[i], reverse=True)
            batches.extend(group[i : i + self.batch_size] for i in range(0, len(group), self.batch_size))
        if self.drop_last:
            batches = [batch for batch in batches if len(batch) == self.batch_size]
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        for position in torch.randperm(len(batches), generator=generator).tolist():
            yield batches[position]

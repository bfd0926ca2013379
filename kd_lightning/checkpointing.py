"""Checkpoints that survive crashes and resume exactly.

- :class:`AtomicCheckpointIO` writes a checkpoint to a temporary file beside its target,
  fsyncs it and renames it over the target, so a crash during a save never leaves the last
  good checkpoint unreadable.
- :class:`ResumableRNG` keeps the random-number generators in the checkpoint, so a resumed
  run draws the same dropout masks as an uninterrupted one.
- :class:`TrainingEpochSync` gives the training samplers the epoch the trainer is in, which
  Lightning gets wrong after some resumes. With the training loader's own position in the
  checkpoint (:class:`~kd_lightning.data.sampling.ResumableDataLoader`), a run resumed
  mid-epoch reads the rest of the epoch, and every later one, as an uninterrupted run does.
- :func:`last_checkpoint` overwrites ``last.ckpt`` at every validation (Lightning 2.6's
  ``save_last`` beside a monitored checkpoint only writes it when the metric improves).
- :func:`resolve_last_checkpoint` makes ``--ckpt_path last`` find the newest run of the
  configured logger (each run logs to a new ``version_N`` folder, where Lightning's own lookup
  does not look) and resume into that run's folder.

What a checkpoint holds besides: the student, the loss-owned projections and buffers
(precomputed teacher statistics), optimiser, scheduler and loop state come from Lightning;
the teacher only with ``DistillModule(save_teacher=True)``.
"""

from __future__ import annotations

import os
import random
import re
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.fabric.plugins import CheckpointIO, TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import CombinedLoader

LAST_CHECKPOINT = re.compile(r"^last(-v\d+)?\.ckpt$")


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` into a hidden temporary file in the target's folder, fsync, then
    ``os.replace`` onto the target (and fsync the folder, so the rename itself is durable).

    Lightning's own :class:`TorchCheckpointIO` stages the bytes in memory and in the system
    temp folder, then moves them over: when that folder is on another file system (a tmpfs
    ``/tmp``, a network run folder) the move is a copy that a crash can cut short, and nothing
    is fsynced. Here the rename is always within one file system, hence atomic; the
    checkpoint is streamed to disk rather than held twice in memory. A crash leaves at most a
    ``.<name>.<pid>.<random>.tmp`` file, which no checkpoint pattern matches. URLs
    (``s3://``, ``file://`` ...) go through Lightning's fsspec path unchanged.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            # os.open with mode 0o666 applies the umask, as a normal file creation does
            descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            with os.fdopen(descriptor, "wb") as handle:
                torch.save(checkpoint, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, path)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        _fsync_folder(path.parent)


def _fsync_folder(folder: Path) -> None:
    """Persist a rename in ``folder`` (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def with_atomic_checkpoint_io(plugins: Any) -> list[Any]:
    """The Trainer ``plugins`` (None, one, or a list) plus an :class:`AtomicCheckpointIO`,
    unless they already name a ``CheckpointIO`` of their own."""
    listed = (
        []
        if plugins is None
        else list(plugins)
        if isinstance(plugins, Sequence) and not isinstance(plugins, str)
        else [plugins]
    )
    if any(isinstance(plugin, CheckpointIO) for plugin in listed):
        return listed
    return [*listed, AtomicCheckpointIO()]


# ---- random-number generators ------------------------------------------------------------------
def rng_states() -> dict[str, Any]:
    """The state of Python's, NumPy's and torch's (CPU and every CUDA device's) generators."""
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    states: dict[str, Any] = {
        "python": random.getstate(),
        # NumPy's key array as a tensor: checkpoints then load with torch.load(weights_only=True)
        "numpy": (kind, torch.from_numpy(keys.copy()), int(position), int(has_gauss), float(cached_gaussian)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["torch.cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore what :func:`rng_states` returned (CUDA states only where there are CUDA devices)."""
    random.setstate(states["python"])
    kind, keys, position, has_gauss, cached_gaussian = states["numpy"]
    np.random.set_state((kind, np.asarray(keys), position, has_gauss, cached_gaussian))
    torch.set_rng_state(states["torch"])
    if "torch.cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["torch.cuda"])


class ResumableRNG(pl.Callback):
    """Training draws from the generators as an uninterrupted run would, after a resume.

    At the end of every training batch the generators' state is recorded; at the start of the
    next batch, and of the next epoch, it is restored. Randomness spent between two steps
    (validation, the iterators Lightning makes and drops) thus never shifts what training
    draws next: the dropout masks, and the seed a shuffled sampler draws when the epoch's
    data iterator is made. A checkpoint taken anywhere between two steps (after a batch, after
    validation, at the end of an epoch) holds exactly the state the next step starts from, and
    a resumed run restores it there. Loading a checkpoint also sets the generators at once.

    Under DDP the checkpoint holds process 0's state, which every process restores: with one
    ``seed_everything`` for all processes (the CLI's default) their states are identical anyway.
    A resume mid-epoch also needs a resumable (stateful) training loader, such as
    :class:`~kd_lightning.data.sampling.ResumableDataLoader`: Lightning otherwise restarts the
    epoch's data from its first batch.
    """

    def __init__(self) -> None:
        self._after_last_step: dict[str, Any] | None = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._after_last_step = rng_states()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if self._after_last_step is not None:
            set_rng_states(self._after_last_step)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # just before the epoch's data iterator is made: a shuffled sampler draws its seed here
        self.on_train_batch_start(trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {"rng_states": self._after_last_step if self._after_last_step is not None else rng_states()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._after_last_step = state_dict["rng_states"]
        set_rng_states(self._after_last_step)


def set_training_epoch(loader: Any, epoch: int) -> None:
    """Call ``set_epoch(epoch)`` on what orders ``loader``'s rows: its sampler, its batch
    sampler and the batch sampler's sampler, where they have ``set_epoch``."""
    batch_sampler = getattr(loader, "batch_sampler", None)
    candidates = (getattr(loader, "sampler", None), batch_sampler, getattr(batch_sampler, "sampler", None))
    for candidate in {id(c): c for c in candidates if c is not None}.values():
        set_epoch = getattr(candidate, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)


class TrainingEpochSync(pl.Callback):
    """At the start of every training epoch, set the training samplers' epoch to
    ``trainer.current_epoch``.

    Lightning 2.6 sets it from its count of processed epochs, which runs one ahead of the
    current epoch for the rest of a run resumed from a checkpoint taken at the end of an
    epoch (``ModelCheckpoint``'s default when validation runs once per epoch): every later
    epoch would read the next epoch's order. This hook runs after Lightning's ``set_epoch``
    and before the epoch's first batch is drawn. Resumes into the middle of an epoch do not
    call it, and need not: there Lightning's count is right.
    """

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.train_dataloader is None:
            return
        for loader in CombinedLoader(trainer.train_dataloader).flattened:
            set_training_epoch(loader, trainer.current_epoch)


# ---- --ckpt_path last ---------------------------------------------------------------------------
def last_checkpoint() -> ModelCheckpoint:
    """A checkpoint that overwrites ``last.ckpt`` at the end of every validation (or of every
    epoch without validation): where ``--ckpt_path last`` resumes from.

    Beside a ``ModelCheckpoint(monitor=..., save_last=True)``, Lightning 2.6 writes
    ``last.ckpt`` only when a best checkpoint is saved at the same step, so ``last`` is the
    best rather than the latest state and a resume would go back to it. Here nothing is
    monitored: every save replaces ``last.ckpt`` (through the trainer's CheckpointIO, atomic
    with :class:`AtomicCheckpointIO`).
    """
    return ModelCheckpoint(filename="last", enable_version_counter=False)


def newest_last_checkpoint(run_root: str | Path) -> Path | None:
    """The most recently written ``last.ckpt`` (or ``last-vN.ckpt``) in
    ``run_root/version_*/checkpoints``, or None."""
    found = [
        path
        for path in Path(run_root).glob("version_*/checkpoints/*.ckpt")
        if LAST_CHECKPOINT.match(path.name) and path.is_file()
    ]
    return max(found, key=lambda path: path.stat().st_mtime_ns, default=None)


def resolve_last_checkpoint(config: Any) -> None:
    """Turn ``ckpt_path: last`` into the newest run's ``last.ckpt`` and log into that run.

    ``config`` is one subcommand's parsed config (``cli.config["fit"]``). This applies when the
    logger is configured by ``class_path`` with ``save_dir``/``name`` and no fixed ``version``
    (TensorBoard, CSV): the newest ``last*.ckpt`` under ``save_dir/name/version_*`` becomes
    the checkpoint and its ``version_N`` the logger's version, so the resumed curves continue
    in the same folder. Otherwise (or when no run has a last checkpoint yet) ``last`` is left
    to Lightning, which then starts from scratch: ``--ckpt_path last`` is safe on a first run.
    """
    if config.get("ckpt_path") != "last":
        return
    logger = config.get("trainer.logger")
    init_args = logger.get("init_args") if hasattr(logger, "get") else None
    if init_args is None or init_args.get("save_dir") is None or init_args.get("version") is not None:
        return
    name = init_args.get("name")
    run_root = Path(init_args.save_dir) / name if name else Path(init_args.save_dir)
    checkpoint = newest_last_checkpoint(run_root)
    if checkpoint is not None:
        config.ckpt_path = str(checkpoint)
        init_args.version = checkpoint.parent.parent.name

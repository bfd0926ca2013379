"""``TeacherCache``: the frozen teacher's outputs over a split, on disk, read back by example index.

One pass of the teacher writes what the losses need — the logits of every class and each
teacher tap after its reduction — as memory-mapped ``.npy`` arrays (float16 by default). A
training step then reads the rows of its batch (``batch["index"]``) instead of running the
teacher, and the losses receive the same :class:`~kd_lightning.outputs.ModelOutputs`.

The cache folder's name is a hash of everything that determines its content: the tokenised
split's ``datasets`` fingerprint (data, tokenizer, ``max_length``, sample limits), the teacher's
weights, the teacher taps (path and reduction) and the storage dtype. Any change gives a new
folder, never a stale one. Folders are written under a temporary name and renamed when
complete, so an interrupted build never looks complete.

Layout: ``meta.json``, ``logits.npy`` (N x C), ``tap.<name>.npy`` (N x d for ``cls``/``mean``;
all token rows for ``tokens``, with ``tap.<name>.offsets.npy`` (N + 1) giving each example's
rows).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from kd_lightning.cache import build_atomically, cache_root
from kd_lightning.outputs import ModelOutputs
from kd_lightning.taps import TapSpec
from kd_lightning.teacher_pass import model_pass

CACHEABLE_REDUCTIONS = ("cls", "mean", "tokens")  # and "none" on outputs with one row per example


@dataclass
class TeacherCacheConfig:
    """Read the teacher's training-split outputs from a cache instead of running it.

    Args:
        dtype: storage precision, ``float16`` (default) or ``float32``.
        root: folder of the caches; default ``<project cache>/teacher_outputs``.
        build: build the cache when missing (else a missing cache is an error).
    """

    dtype: Literal["float16", "float32"] = "float16"
    root: str | None = None
    build: bool = True


class CacheRefusedError(ValueError):
    """The configuration makes cached teacher outputs wrong (random inputs, raw tap outputs)."""


def cache_key(dataset_fingerprint: str, teacher_fingerprint: str, taps: Mapping[str, TapSpec], dtype: str) -> str:
    spec = sorted((name, t.path, t.reduce) for name, t in taps.items() if t.module == "teacher")
    body = json.dumps([dataset_fingerprint, teacher_fingerprint, spec, dtype])
    return hashlib.sha256(body.encode()).hexdigest()[:24]


def check_cacheable(datamodule: Any) -> None:
    """Refuse data whose inputs change from one epoch to the next (tap shapes are checked while building)."""
    if getattr(datamodule, "randomized_inputs", False):
        raise CacheRefusedError(
            f"{type(datamodule).__name__} changes its inputs at random (augmentation or masking), so cached teacher "
            "outputs would not match the batches: remove teacher_cache from the model config, or turn the "
            "randomisation off."
        )


class DamagedCacheError(ValueError):
    """A teacher cache folder that cannot be read, or that holds the outputs of another key."""


class TeacherCache:
    """A complete cache folder, opened read-only with memory maps.

    Args:
        folder: the cache folder.
        key: the :func:`cache_key` its content must have been built for; a folder whose
            ``meta.json`` names another key (another teacher, split, taps or dtype) is refused,
            never read. ``None`` skips the check.
    """

    def __init__(self, folder: Path, key: str | None = None) -> None:
        self.folder = Path(folder)
        rebuild = (
            f"Delete {self.folder}: the next fit with teacher_cache rebuilds it "
            "(or `python -m kd_lightning cache --config <config>`)."
        )
        meta_file = self.folder / "meta.json"
        if not meta_file.is_file():
            raise FileNotFoundError(f"{self.folder} is not a teacher cache (no meta.json). {rebuild}")
        try:
            self.meta = json.loads(meta_file.read_text())
            self.logits = np.load(self.folder / "logits.npy", mmap_mode="r")
            self.features = {name: np.load(self.folder / f"tap.{name}.npy", mmap_mode="r") for name in self.meta["taps"]}
            self.offsets = {
                name: np.load(self.folder / f"tap.{name}.offsets.npy")
                for name, reduce in self.meta["taps"].items()
                if reduce == "tokens"
            }
            self._check_rows()
        except (OSError, ValueError, KeyError, TypeError) as err:  # truncated arrays, broken JSON, missing files
            raise DamagedCacheError(f"the teacher cache at {self.folder} is damaged or incomplete ({err}). {rebuild}") from err
        if key is not None and self.meta.get("key") != key:
            raise DamagedCacheError(
                f"the teacher cache at {self.folder} holds outputs for key {self.meta.get('key')!r}, not {key!r}: it was "
                f"built from another teacher, data split, taps or dtype, and is not used. {rebuild}"
            )

    def _check_rows(self) -> None:
        """Every array has a row per example (or per token row of ``tokens`` taps)."""
        examples = int(self.meta["num_examples"])
        expected = {"logits.npy": (self.logits, examples)}
        for name, array in self.features.items():
            expected[f"tap.{name}.npy"] = (array, int(self.offsets[name][-1]) if name in self.offsets else examples)
        for file, (array, rows) in expected.items():
            if array.shape[0] != rows:
                raise ValueError(f"{file} has {array.shape[0]} rows where meta.json says {rows}")

    def __len__(self) -> int:
        return int(self.meta["num_examples"])

    def read(self, indices: Tensor, device: torch.device | str = "cpu") -> ModelOutputs:
        """The cached outputs of the examples at ``indices``, in that order, as float32."""
        idx = indices.detach().cpu().numpy()
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"example index out of range for a cache of {len(self)} examples: {idx.min()}..{idx.max()}")
        logits = torch.from_numpy(np.asarray(self.logits[idx], dtype=np.float32)).to(device)
        features = {}
        for name, array in self.features.items():
            if name in self.offsets:
                off = self.offsets[name]
                rows = np.concatenate([np.asarray(array[off[i] : off[i + 1]]) for i in idx]) if idx.size else array[:0]
            else:
                rows = array[idx]
            features[name] = torch.from_numpy(np.asarray(rows, dtype=np.float32)).to(device)
        return ModelOutputs(logits=logits, features=features)

    @classmethod
    def open_or_build(
        cls,
        teacher: nn.Module,
        taps: Mapping[str, TapSpec],
        dataset: Any,
        collate: Any,
        key: str,
        config: TeacherCacheConfig,
        batch_size: int = 64,
    ) -> TeacherCache:
        """Open the cache ``key`` under ``config.root``, building it first when missing."""
        root = Path(config.root) if config.root else cache_root() / "teacher_outputs"
        target = root / key
        if not target.exists():
            if not config.build:
                raise FileNotFoundError(f"no teacher cache at {target}; build it with `python -m kd_lightning cache --config ...`")
            build_atomically(target, lambda tmp: write_cache(tmp, teacher, taps, dataset, collate, config.dtype, batch_size, key))
        return cls(target, key)


def write_cache(
    folder: Path,
    teacher: nn.Module,
    taps: Mapping[str, TapSpec],
    dataset: Any,
    collate: Any,
    dtype: str,
    batch_size: int,
    key: str,
) -> None:
    """One pass of ``teacher`` over ``dataset`` (rows carry ``index``), writing the arrays into ``folder``."""
    reductions = {name: spec.reduce for name, spec in taps.items() if spec.module == "teacher"}
    n = len(dataset)
    lengths = np.array([len(ids) for ids in dataset["input_ids"]], dtype=np.int64)
    offsets = {name: np.concatenate([[0], np.cumsum(lengths)]) for name, r in reductions.items() if r == "tokens"}
    arrays: dict[str, np.ndarray] = {}
    written = np.zeros(n, dtype=bool)
    for step in model_pass(teacher, taps, "teacher", dataset, collate, batch_size, "Caching teacher outputs"):
        logits = step.logits.float().cpu().numpy()
        features = {k: v.float().cpu().numpy() for k, v in step.features.items()}
        index = step.batch["index"].cpu().numpy()
        uncacheable = [
            k for k, v in features.items() if reductions[k] == "none" and (v.ndim != 2 or v.shape[0] != len(index))
        ]
        if uncacheable:
            raise CacheRefusedError(
                f"teacher tap(s) {uncacheable} use reduce 'none' on outputs of shape {features[uncacheable[0]].shape}, "
                f"which depend on the batch's padding; cache one row per example ({', '.join(CACHEABLE_REDUCTIONS)} "
                "reductions, or 'none' on pooled outputs) or remove teacher_cache."
            )
        if not arrays:
            arrays["logits"] = np.lib.format.open_memmap(folder / "logits.npy", "w+", dtype, (n, logits.shape[-1]))
            for name, rows in features.items():
                total = int(offsets[name][-1]) if name in offsets else n
                arrays[name] = np.lib.format.open_memmap(folder / f"tap.{name}.npy", "w+", dtype, (total, rows.shape[-1]))
        arrays["logits"][index] = logits
        for name, rows in features.items():
            if name in offsets:
                start = 0
                for i in index:
                    count = int(lengths[i])
                    arrays[name][offsets[name][i] : offsets[name][i] + count] = rows[start : start + count]
                    start += count
            else:
                arrays[name][index] = rows
        written[index] = True
    if not written.all():
        raise RuntimeError(f"teacher cache build saw {int(written.sum())} of {n} examples: the loader must cover the split")
    for array in arrays.values():
        array.flush()
    for name, off in offsets.items():
        np.save(folder / f"tap.{name}.offsets.npy", off)
    meta = {"key": key, "num_examples": n, "dtype": dtype, "taps": reductions}
    (folder / "meta.json").write_text(json.dumps(meta))

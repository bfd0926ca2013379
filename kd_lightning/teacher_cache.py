"""``TeacherCache``: the frozen teacher's outputs over a split, on disk, read back by example index.

One pass of the teacher writes what the losses need — the teacher's output distribution and
each teacher tap after its reduction — as memory-mapped ``.npy`` arrays (float16 by default). A
training step then reads the rows of its batch (``batch["index"]``) instead of running the
teacher, and the losses receive the same :class:`~kd_lightning.outputs.ModelOutputs`.

The cache folder's name is a hash of everything that determines its content: the tokenised
split's ``datasets`` fingerprint (data, tokenizer, ``max_length``, sample limits), the teacher's
weights, the teacher taps (path and reduction) and the storage dtype; for vocabulary-sized
outputs also ``top_k``, the vocabulary size and the tokenisation settings. Any change gives a
new folder, never a stale one. Folders are written under a temporary name and renamed when
complete, so an interrupted build never looks complete.

**Classifier outputs** (:class:`TeacherCache`): ``meta.json``, ``logits.npy`` (N x C, every
class), ``tap.<name>.npy`` (N x d for ``cls``/``mean``; all token rows for ``tokens``, with
``tap.<name>.offsets.npy`` (N + 1) giving each example's rows).

**Vocabulary-sized outputs** (causal LMs, :class:`TopKTeacherCache`): only the positions the
token-level losses count — those that predict a response token (``labels != -100`` after the
shift; prompt and padding store nothing) — and of each only the ``k = top_k`` largest teacher
log-probabilities ``log p_t`` (storage dtype), their token ids (int32) and the log of the
remaining mass ``log(1 - sum_{top-k} p_t)`` (float32, computed as the log-sum-exp of the other
``V - k`` log-probabilities, so it stays exact when the top-k mass is close to 1). They are
ragged arrays with per-example offsets, the layout of ``tokens`` taps: ``topk_logprobs.npy``
(R x k), ``topk_indices.npy`` (R x k), ``rest_logprob.npy`` (R), ``tokens.offsets.npy``
(N + 1), ``index.npy`` (N, the examples' ``index`` values), where R is the number of response
positions of the split; taps as above (``tokens`` rows are the same response positions).

Storage per response position: ``k * (bytes of dtype + 4) + 4`` bytes — **388 bytes for
k = 64 in float16** (516 in float32), plus 16 bytes per example (index and offset) — against
``2 V`` bytes for a full float16 row (98,304 for SmolLM2's V = 49,152; 100,544 for OPT's
50,272): about 250 times less. Measured on ``configs/causal_lm/quick_smollm2_cached.yaml``
(73 examples, 4,151 response tokens): 388.4 bytes per response token, all files but the taps.
``top_k: 64`` is the default because a teacher's top tokens hold most of its mass at response
positions — there, SmolLM2-135M-Instruct's top 64 hold 95% on average (median 98.7%, 10th
percentile 84%) — at a cost linear in k; ``rest_logprob`` records per position what they miss.
Raise it for flatter teachers or temperatures above 1; ``top_k >= V`` stores every token.

**Reconstruction.** A step rebuilds the teacher's row at a position from its top-k entries
``S`` and remaining mass ``m = 1 - sum_{j in S} p_j``, spread uniformly over the other
``V - k`` tokens::

    r_j = log p_j                   j in S
    r_j = log m - log(V - k)        j not in S
    log q = log_softmax(r)

The top-k entries are exact, the total mass is 1 (the final normalisation only absorbs the
storage rounding), and the tail keeps its total mass but loses its shape. The losses soften
``q`` as they soften live logits (``softmax(log q / T)``): the ratios among the top-k are exact
at any temperature. With ``k = V`` the reconstruction is the teacher's distribution itself,
so cached and live losses agree to storage precision. The rows are rebuilt a chunk at a time
(:class:`TopKLogProbs`), inside the chunked token-level losses, so the ``tokens x vocab``
teacher tensor of a batch never exists at once (set ``chunk_size`` on the losses).

Which losses can use a top-k cache: the row-wise divergences over the vocabulary
(:class:`~kd_lightning.losses.LogitDivergence` and its subclasses: KL, reverse KL, JS, TVD,
skew KL / RKL, BD-KD), which run on the reconstructed rows; losses that do not read the
teacher (:class:`~kd_lightning.losses.NextTokenCrossEntropy`); and feature losses
(:class:`~kd_lightning.losses.FeatureLoss`), which read cached taps. Losses that need the
teacher's exact full distributions or whole logit matrices (DKD's target split, DIST's
vocabulary-column correlations across the batch, SinKD's plan) are refused when the module is built;
a custom loss declares itself with a class attribute ``accepts_topk_teacher = True`` (or
``False``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
import torch
from torch import Tensor, nn

from kd_lightning.cache import build_atomically, cache_root
from kd_lightning.losses.base import DistillLoss, FeatureLoss
from kd_lightning.losses.logits import LogitDivergence
from kd_lightning.outputs import ModelOutputs
from kd_lightning.taps import TapSpec
from kd_lightning.teacher_pass import model_pass, outputs_pass
from kd_lightning.topk_logprobs import TopKLogProbs, top_k_log_probs

CACHEABLE_REDUCTIONS = ("cls", "mean", "tokens")  # and "none" on outputs with one row per example
#: Tap reductions a top-k (causal-LM) cache stores: over the response positions, whatever the padding.
TOPK_CACHEABLE_REDUCTIONS = ("mean", "tokens")
STORAGE_DTYPES = ("float16", "float32")


@dataclass
class TeacherCacheConfig:
    """Read the teacher's training-split outputs from a cache instead of running it.

    Args:
        dtype: storage precision, ``float16`` (default) or ``float32``.
        root: folder of the caches; default ``<project cache>/teacher_outputs``.
        build: build the cache when missing (else a missing cache is an error).
        top_k: vocabulary-sized outputs (causal LMs) only: the teacher log-probabilities kept
            per response position (default 64: 388 bytes per position in float16; see the
            module docstring); ``top_k >= V`` keeps every token. Part of the cache key;
            classifier caches always store every class and ignore it.
        batch_size: examples per batch of the building pass; default 64 for classifiers, the
            data module's ``eval_batch_size`` for causal LMs.
    """

    dtype: Literal["float16", "float32"] = "float16"
    root: str | None = None
    build: bool = True
    top_k: int = 64
    batch_size: int | None = None

    def __post_init__(self) -> None:
        if self.dtype not in STORAGE_DTYPES:
            raise ValueError(f"teacher_cache.dtype must be one of {', '.join(STORAGE_DTYPES)}, got {self.dtype!r}")
        if not isinstance(self.top_k, int) or self.top_k < 1:
            raise ValueError(f"teacher_cache.top_k must be a positive number of tokens (e.g. 64), got {self.top_k!r}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(
                f"teacher_cache.batch_size must be a positive number of examples or null, got {self.batch_size!r}"
            )


class CacheRefusedError(ValueError):
    """The configuration makes cached teacher outputs wrong (random inputs, raw tap outputs,
    or a loss that needs more than a top-k cache holds)."""


def cache_key(
    dataset_fingerprint: str,
    teacher_fingerprint: str,
    taps: Mapping[str, TapSpec],
    dtype: str,
    settings: Mapping[str, Any] | None = None,
) -> str:
    """The name of the cache folder: a hash of the split, the teacher, its taps, the dtype and,
    for top-k caches, ``settings`` (``top_k``, vocabulary size, tokenisation settings)."""
    spec = sorted((name, t.path, t.reduce) for name, t in taps.items() if t.module == "teacher")
    parts: list[Any] = [dataset_fingerprint, teacher_fingerprint, spec, dtype]
    if settings is not None:
        parts.append(dict(settings))
    body = json.dumps(parts, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()[:24]


def check_cacheable(datamodule: Any) -> None:
    """Refuse data whose inputs change from one epoch to the next (tap shapes are checked while building)."""
    if getattr(datamodule, "randomized_inputs", False):
        raise CacheRefusedError(
            f"{type(datamodule).__name__} changes its inputs at random (augmentation or masking), so cached teacher "
            "outputs would not match the batches: remove teacher_cache from the model config, or turn the "
            "randomisation off."
        )


def tokenization_settings(datamodule: Any) -> dict[str, Any]:
    """What a data module's tokenisation depends on, for top-k cache keys (the split's fingerprint
    covers them too for kd_lightning's data modules; this keeps keys honest for others). Padding
    is left out: each position's outputs do not depend on it."""
    names = ("max_length", "max_prompt_length", "template", "tokenizer_name")
    settings = {name: getattr(datamodule, name) for name in names if hasattr(datamodule, name)}
    tokenizer_key = getattr(datamodule, "_tokenizer_key", None)
    if callable(tokenizer_key) and getattr(datamodule, "tokenizer", None) is not None:
        settings["tokenizer"] = tokenizer_key()
    return settings


def accepts_topk_teacher(loss: DistillLoss) -> bool:
    """Whether ``loss`` can run on a top-k cache (see the module docstring): its own
    ``accepts_topk_teacher`` attribute when it has one; else true for losses that do not read
    the teacher, for row-wise divergences over the vocabulary and for feature losses."""
    declared = getattr(loss, "accepts_topk_teacher", None)
    if declared is not None:
        return bool(declared)
    return not loss.needs_teacher or isinstance(loss, (LogitDivergence, FeatureLoss))


def check_topk_losses(losses: Iterable[DistillLoss]) -> None:
    """Refuse a top-k teacher cache for losses that need more than it holds."""
    refused = [f"{loss.name} ({type(loss).__name__})" for loss in losses if not accepts_topk_teacher(loss)]
    if refused:
        raise CacheRefusedError(
            f"loss(es) {', '.join(refused)} need the teacher's exact full output distributions, which a top-k teacher "
            "cache does not hold (it keeps the top_k log-probabilities per response token and the remaining mass). "
            "Remove teacher_cache to run the live teacher, or use a row-wise divergence (KLDivergence, "
            "ReverseKLDivergence, JSDivergence, TotalVariationDistance, SkewKLDivergence, SkewReverseKLDivergence, "
            "BalancedDivergence), which runs on the reconstructed rows."
        )


class DamagedCacheError(ValueError):
    """A teacher cache folder that cannot be read, or that holds the outputs of another key."""


def ragged_rows(array: np.ndarray, offsets: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The stored rows of examples ``rows`` of a ragged array (example ``i`` holds
    ``array[offsets[i]:offsets[i + 1]]``), concatenated in the order of ``rows``."""
    if not rows.size:
        return np.asarray(array[:0])
    return np.concatenate([np.asarray(array[offsets[i] : offsets[i + 1]]) for i in rows])


# ---- reading ---------------------------------------------------------------------------------------
class TeacherCache:
    """A complete cache folder of classifier outputs, opened read-only with memory maps.

    Args:
        folder: the cache folder.
        key: the :func:`cache_key` its content must have been built for; a folder whose
            ``meta.json`` names another key (another teacher, split, taps or dtype) is refused,
            never read. ``None`` skips the check.
    """

    #: ``meta.json``'s ``layout`` (absent in classifier caches).
    layout = "logits"

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
            layout = self.meta.get("layout", "logits")
            if layout != self.layout:
                raise ValueError(f"meta.json says layout {layout!r} where {type(self).__name__} reads {self.layout!r}")
            self._open_arrays()
            self._check_rows()
        except (OSError, ValueError, KeyError, TypeError) as err:  # truncated arrays, broken JSON, missing files
            raise DamagedCacheError(
                f"the teacher cache at {self.folder} is damaged or incomplete ({err}). {rebuild}"
            ) from err
        if key is not None and self.meta.get("key") != key:
            raise DamagedCacheError(
                f"the teacher cache at {self.folder} holds outputs for key {self.meta.get('key')!r}, not {key!r}: it was "
                f"built from another teacher, data split, taps, dtype or top_k, and is not used. {rebuild}"
            )

    def _open_arrays(self) -> None:
        self.logits = np.load(self.folder / "logits.npy", mmap_mode="r")
        self._open_taps()

    def _open_taps(self) -> None:
        self.features = {name: np.load(self.folder / f"tap.{name}.npy", mmap_mode="r") for name in self.meta["taps"]}
        self.offsets = {
            name: np.load(self.folder / f"tap.{name}.offsets.npy")
            for name, reduce in self.meta["taps"].items()
            if reduce == "tokens"
        }

    def _expected_rows(self) -> dict[str, tuple[np.ndarray, int]]:
        """file -> (array, rows it must have)."""
        examples = int(self.meta["num_examples"])
        expected = {"logits.npy": (self.logits, examples)}
        for name, array in self.features.items():
            expected[f"tap.{name}.npy"] = (array, int(self.offsets[name][-1]) if name in self.offsets else examples)
        return expected

    def _check_rows(self) -> None:
        """Every array has a row per example (or per token row of ``tokens`` taps)."""
        for file, (array, rows) in self._expected_rows().items():
            if array.shape[0] != rows:
                raise ValueError(f"{file} has {array.shape[0]} rows where meta.json says {rows}")

    def __len__(self) -> int:
        return int(self.meta["num_examples"])

    def rows_of(self, indices: Tensor) -> np.ndarray:
        """The cache rows of the examples whose ``index`` is ``indices`` (here the row itself)."""
        idx = indices.detach().cpu().numpy()
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(
                f"example index out of range for a cache of {len(self)} examples: {idx.min()}..{idx.max()}"
            )
        return idx

    def _read_features(self, rows: np.ndarray, device: torch.device | str) -> dict[str, Tensor]:
        features = {}
        for name, array in self.features.items():
            data = ragged_rows(array, self.offsets[name], rows) if name in self.offsets else array[rows]
            features[name] = torch.from_numpy(np.asarray(data, dtype=np.float32)).to(device)
        return features

    def read(self, indices: Tensor, device: torch.device | str = "cpu") -> ModelOutputs:
        """The cached outputs of the examples at ``indices``, in that order, as float32."""
        rows = self.rows_of(indices)
        logits = torch.from_numpy(np.asarray(self.logits[rows], dtype=np.float32)).to(device)
        return ModelOutputs(logits=logits, features=self._read_features(rows, device))

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

        def write(tmp: Path) -> None:
            write_cache(tmp, teacher, taps, dataset, collate, config.dtype, config.batch_size or batch_size, key)

        return open_or_build_folder(cls, key, config, write)


class TopKTeacherCache(TeacherCache):
    """A complete top-k cache folder of vocabulary-sized outputs (causal LMs), read-only, memory-mapped.

    See the module docstring for the layout, the storage cost and how a row is rebuilt.
    :meth:`read` places each example's stored positions on the batch's token mask and returns
    :class:`TopKLogProbs` as the teacher's logits, beside the cached taps.

    Args:
        folder, key: as for :class:`TeacherCache`.
    """

    layout = "topk"

    def _open_arrays(self) -> None:
        self.top_k = int(self.meta["top_k"])
        self.vocab_size = int(self.meta["vocab_size"])
        self.top_logprobs = np.load(self.folder / "topk_logprobs.npy", mmap_mode="r")
        self.top_indices = np.load(self.folder / "topk_indices.npy", mmap_mode="r")
        self.rest_logprob = np.load(self.folder / "rest_logprob.npy", mmap_mode="r")
        self.token_offsets = np.load(self.folder / "tokens.offsets.npy")
        self.index = np.load(self.folder / "index.npy")
        self._order = np.argsort(self.index, kind="stable")
        self._sorted_index = self.index[self._order]
        self._open_taps()

    def _expected_rows(self) -> dict[str, tuple[np.ndarray, int]]:
        examples, tokens = int(self.meta["num_examples"]), int(self.token_offsets[-1])
        expected = {
            "index.npy": (self.index, examples),
            "tokens.offsets.npy": (self.token_offsets, examples + 1),
            "topk_logprobs.npy": (self.top_logprobs, tokens),
            "topk_indices.npy": (self.top_indices, tokens),
            "rest_logprob.npy": (self.rest_logprob, tokens),
        }
        for name, array in self.features.items():
            expected[f"tap.{name}.npy"] = (array, int(self.offsets[name][-1]) if name in self.offsets else examples)
        return expected

    def _check_rows(self) -> None:
        super()._check_rows()
        for file, array in (("topk_logprobs.npy", self.top_logprobs), ("topk_indices.npy", self.top_indices)):
            if array.ndim != 2 or array.shape[1] != self.top_k:
                raise ValueError(f"{file} has shape {array.shape} where meta.json says top_k = {self.top_k}")

    def rows_of(self, indices: Tensor) -> np.ndarray:
        """The cache rows of the examples whose ``index`` values are ``indices``."""
        idx = indices.detach().cpu().numpy().astype(np.int64).reshape(-1)
        at = np.minimum(np.searchsorted(self._sorted_index, idx), max(len(self._sorted_index) - 1, 0))
        found = self._sorted_index[at] == idx if len(self._sorted_index) else np.zeros(idx.shape, dtype=bool)
        if not found.all():
            raise IndexError(
                f"example index(es) {idx[~found][:5].tolist()} are not in the teacher cache at {self.folder} "
                f"({len(self)} examples): the batch comes from another split or data set than the cache was built on"
            )
        return self._order[at]

    def read(
        self, indices: Tensor, device: torch.device | str = "cpu", token_mask: Tensor | None = None
    ) -> ModelOutputs:
        """The cached outputs of the examples at ``indices`` (their ``index`` values), in that order.

        ``token_mask`` ``(batch, seq)`` marks the batch's positions that predict a response token;
        each example's stored rows go to its marked positions in order. Logits are a
        :class:`TopKLogProbs` (float32), taps float32 tensors.
        """
        if token_mask is None:
            raise ValueError(
                "a top-k teacher cache needs the batch's token mask (the positions that predict a response token)"
            )
        rows = self.rows_of(indices)
        mask = token_mask.to(torch.bool)
        if mask.dim() != 2 or mask.shape[0] != rows.size:
            raise ValueError(f"{rows.size} example indices for a token mask of shape {tuple(mask.shape)}")
        stored = self.token_offsets[rows + 1] - self.token_offsets[rows]
        found = mask.sum(1).cpu().numpy()
        if (found != stored).any():
            bad = int(np.flatnonzero(found != stored)[0])
            raise DamagedCacheError(
                f"the batch's example {int(indices.reshape(-1)[bad])} has {int(found[bad])} response positions where the "
                f"teacher cache at {self.folder} stores {int(stored[bad])}: the data or its tokenisation changed since the "
                f"cache was built. Delete {self.folder}: the next fit with teacher_cache rebuilds it."
            )

        def gather(array: np.ndarray, dtype: Any) -> Tensor:
            data = ragged_rows(array, self.token_offsets, rows)
            return torch.from_numpy(np.asarray(data, dtype=dtype)).to(device)

        logits = TopKLogProbs(
            gather(self.top_logprobs, np.float32),
            gather(self.top_indices, np.int64),
            gather(self.rest_logprob, np.float32),
            mask.to(device),
            self.vocab_size,
        )
        return ModelOutputs(logits=logits, features=self._read_features(rows, device), token_mask=mask)  # type: ignore[arg-type]


CacheT = TypeVar("CacheT", bound=TeacherCache)


def open_or_build_folder(
    cls: type[CacheT], key: str, config: TeacherCacheConfig, write: Callable[[Path], None]
) -> CacheT:
    """Open the cache ``key`` under ``config.root`` as ``cls``, first building it atomically with
    ``write(tmp_folder)`` when it is missing (and ``config.build`` allows)."""
    root = Path(config.root) if config.root else cache_root() / "teacher_outputs"
    target = root / key
    if not target.exists():
        if not config.build:
            raise FileNotFoundError(
                f"no teacher cache at {target}; build it with `python -m kd_lightning cache --config ...`"
            )
        build_atomically(target, write)
    return cls(target, key)


# ---- writing ---------------------------------------------------------------------------------------
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
        _refuse_raw_taps(features, reductions, len(index), CACHEABLE_REDUCTIONS)
        if not arrays:
            arrays["logits"] = np.lib.format.open_memmap(folder / "logits.npy", "w+", dtype, (n, logits.shape[-1]))
            for name, rows in features.items():
                total = int(offsets[name][-1]) if name in offsets else n
                arrays[name] = np.lib.format.open_memmap(
                    folder / f"tap.{name}.npy", "w+", dtype, (total, rows.shape[-1])
                )
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
        raise RuntimeError(
            f"teacher cache build saw {int(written.sum())} of {n} examples: the loader must cover the split"
        )
    for array in arrays.values():
        array.flush()
    for name, off in offsets.items():
        np.save(folder / f"tap.{name}.offsets.npy", off)
    meta = {"key": key, "num_examples": n, "dtype": dtype, "taps": reductions}
    (folder / "meta.json").write_text(json.dumps(meta))


def _refuse_raw_taps(
    features: Mapping[str, np.ndarray], reductions: Mapping[str, str], batch: int, allowed: Iterable[str]
) -> None:
    """Refuse ``none`` taps whose outputs are not one row per example (they depend on the batch's padding)."""
    uncacheable = [k for k, v in features.items() if reductions[k] == "none" and (v.ndim != 2 or v.shape[0] != batch)]
    if uncacheable:
        raise CacheRefusedError(
            f"teacher tap(s) {uncacheable} use reduce 'none' on outputs of shape {features[uncacheable[0]].shape}, "
            f"which depend on the batch's padding; cache one row per example ({', '.join(allowed)} "
            "reductions, or 'none' on pooled outputs) or remove teacher_cache."
        )


def response_positions(labels: Iterable[int]) -> int:
    """How many positions of one example predict a response token: labels ``!= -100`` after the first."""
    return sum(1 for label in list(labels)[1:] if label != -100)


def _store(values: np.ndarray, dtype: Any) -> np.ndarray:
    """``values`` in the storage dtype, ``-inf`` and underflow clamped to its most negative finite value."""
    return np.maximum(values, np.finfo(dtype).min).astype(dtype)


def write_topk_cache(
    folder: Path,
    outputs: Callable[[Mapping[str, Any]], ModelOutputs],
    teacher: nn.Module,
    taps: Mapping[str, TapSpec],
    dataset: Any,
    collate: Any,
    top_k: int,
    vocab_size: int,
    dtype: str,
    batch_size: int,
    key: str,
    chunk_rows: int = 256,
) -> None:
    """One pass of the teacher over ``dataset``, writing a top-k cache (module docstring) into ``folder``.

    ``outputs(batch)`` is the live teacher forward of a training step: ``(batch, seq, V)`` logits,
    its ``token_mask`` (the positions that predict a response token) and the taps reduced over
    those positions. The top-k of each masked row is taken ``chunk_rows`` rows at a time.
    """
    reductions = {name: spec.reduce for name, spec in taps.items() if spec.module == "teacher"}
    refused = {name: r for name, r in reductions.items() if r not in (*TOPK_CACHEABLE_REDUCTIONS, "none")}
    if refused:
        raise CacheRefusedError(
            f"teacher tap(s) {sorted(refused)} use reduce {sorted(set(refused.values()))}: in a causal LM the first "
            "position sees one token, and which position comes first depends on the batch's padding; a top-k teacher "
            f"cache stores taps reduced over the response positions ({', '.join(TOPK_CACHEABLE_REDUCTIONS)}). Use one "
            "of those, or remove teacher_cache."
        )
    n = len(dataset)
    index = np.asarray(dataset["index"], dtype=np.int64)
    if np.unique(index).size != n:
        raise ValueError(
            "the training split's 'index' column repeats values; a teacher cache needs one index per example"
        )
    counts = np.array([response_positions(labels) for labels in dataset["labels"]], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    total = int(offsets[-1])
    if total == 0:
        raise ValueError(
            "no example of the training split has a response token (every label is -100): nothing to cache"
        )
    row_of = {int(value): row for row, value in enumerate(index)}
    arrays: dict[str, np.ndarray] = {
        "topk_logprobs": np.lib.format.open_memmap(folder / "topk_logprobs.npy", "w+", dtype, (total, top_k)),
        "topk_indices": np.lib.format.open_memmap(folder / "topk_indices.npy", "w+", np.int32, (total, top_k)),
        "rest_logprob": np.lib.format.open_memmap(folder / "rest_logprob.npy", "w+", np.float32, (total,)),
    }
    tap_arrays: dict[str, np.ndarray] = {}
    written = np.zeros(n, dtype=bool)
    for batch, out in outputs_pass(
        outputs, teacher, dataset, collate, batch_size, "Caching teacher top-k log-probabilities"
    ):
        rows = np.array([row_of[int(i)] for i in batch["index"].tolist()], dtype=np.int64)
        mask = out.token_mask.to(torch.bool)
        found = mask.sum(1).cpu().numpy()
        if (found != counts[rows]).any():
            raise RuntimeError(
                f"the teacher pass found {found.tolist()} response positions in a batch whose labels give "
                f"{counts[rows].tolist()}: the collator must keep each example's labels"
            )
        dest = np.concatenate([np.arange(offsets[r], offsets[r + 1]) for r in rows])
        values, ids, rest = _top_k_of_masked_rows(out.logits, mask, top_k, chunk_rows)
        arrays["topk_logprobs"][dest] = _store(values, np.dtype(dtype))
        arrays["topk_indices"][dest] = ids.astype(np.int32)
        arrays["rest_logprob"][dest] = _store(rest, np.float32) if top_k < vocab_size else rest
        features = {k: v.float().cpu().numpy() for k, v in out.features.items()}
        _refuse_raw_taps(features, reductions, len(rows), TOPK_CACHEABLE_REDUCTIONS)
        for name, data in features.items():
            if name not in tap_arrays:
                length = total if reductions[name] == "tokens" else n
                tap_arrays[name] = np.lib.format.open_memmap(
                    folder / f"tap.{name}.npy", "w+", dtype, (length, data.shape[-1])
                )
            tap_arrays[name][dest if reductions[name] == "tokens" else rows] = data
        written[rows] = True
    if not written.all():
        raise RuntimeError(
            f"teacher cache build saw {int(written.sum())} of {n} examples: the loader must cover the split"
        )
    for array in (*arrays.values(), *tap_arrays.values()):
        array.flush()
    np.save(folder / "index.npy", index)
    np.save(folder / "tokens.offsets.npy", offsets)
    for name, reduce in reductions.items():
        if reduce == "tokens":
            np.save(folder / f"tap.{name}.offsets.npy", offsets)
    meta = {
        "key": key,
        "layout": "topk",
        "num_examples": n,
        "num_tokens": total,
        "top_k": top_k,
        "vocab_size": vocab_size,
        "dtype": dtype,
        "taps": reductions,
    }
    (folder / "meta.json").write_text(json.dumps(meta))


def _top_k_of_masked_rows(
    logits: Tensor, mask: Tensor, k: int, chunk_rows: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`top_k_log_probs` of the rows of ``(batch, seq, V)`` logits under ``mask``, row-major,
    ``chunk_rows`` rows at a time (indexing by coordinates copies only the chunk, also from views)."""
    batch_ids, seq_ids = mask.nonzero(as_tuple=True)
    parts: list[tuple[Tensor, Tensor, Tensor]] = []
    for start in range(0, batch_ids.numel(), chunk_rows):
        chunk = logits[batch_ids[start : start + chunk_rows], seq_ids[start : start + chunk_rows]]
        parts.append(tuple(t.cpu() for t in top_k_log_probs(chunk, k)))  # type: ignore[arg-type]
    if not parts:
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64), np.zeros((0,), np.float32)
    values, ids, rest = (torch.cat([p[i] for p in parts]).numpy() for i in range(3))
    return values, ids, rest

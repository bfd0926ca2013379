"""``TextClassificationDataModule``: single texts or text pairs with class labels or scores, on HF ``datasets``."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader
from torchmetrics import MetricCollection
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase

from kd_lightning.data.packaged import PACKAGED_DATASETS, materialize_packaged
from kd_lightning.data.sampling import (
    EpochRandomSampler,
    LengthGroupedBatchSampler,
    ResumableBatchSampler,
    ResumableDataLoader,
)
from kd_lightning.metrics.glue import regression_metrics
from kd_lightning.metrics.task import classification_metrics
from kd_lightning.suggestions import close_matches, did_you_mean

SPLITS = ("train", "validation", "test")
FILE_FORMATS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def file_format(paths: list[str]) -> str:
    """The ``datasets`` builder (csv/json/parquet) for local files, from their extension."""
    formats = set()
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"data file {path!r} does not exist (working directory: {os.getcwd()}){_nearby_files(path)}")
        suffix = Path(path).suffix.lower()
        if suffix not in FILE_FORMATS:
            raise ValueError(f"data file {path!r}: unknown format {suffix!r}; use one of {', '.join(FILE_FORMATS)}")
        formats.add(FILE_FORMATS[suffix])
    if len(formats) != 1:
        raise ValueError(f"data files mix formats {sorted(formats)}: give files of one format")
    return formats.pop()


def _nearby_files(path: str) -> str:
    """The fix for a missing data file: the closest names in its folder, or what to check."""
    folder = Path(path).parent
    if not folder.is_dir():
        return f"; its folder {str(folder)!r} does not exist either: check the path (relative paths start at the working directory)"
    near = close_matches(Path(path).name, [p.name for p in folder.iterdir() if p.is_file()])
    if near:
        return f"; did you mean {' or '.join(repr(str(folder / name)) for name in near)}?"
    return "; check the path (relative paths start at the working directory)"


def _unreadable(path: str, builder: str) -> str | None:
    """Why a local data file cannot be read as ``builder`` (a damaged parquet file, binary or
    non-UTF-8 text), or ``None`` when nothing is visibly wrong."""
    if builder == "parquet":
        import pyarrow.parquet as pq

        try:
            pq.ParquetFile(path)
        except Exception as err:  # pyarrow raises ArrowInvalid, OSError, ... on damaged files
            return f"not a complete parquet file ({err})"
        return None
    with open(path, "rb") as handle:
        head = handle.read(1 << 16)
    if b"\x00" in head:
        return "binary data (it holds NUL bytes), not text"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as err:
        if err.start < len(head) - 3:  # not merely a character cut at the end of the sample
            return f"not UTF-8 text (byte {head[err.start]:#04x} at offset {err.start})"
    return None


def _file_columns(path: str, builder: str) -> list[str] | None:
    """The column names of a local data file (its header, schema or first record), or ``None``."""
    try:
        if builder == "parquet":
            import pyarrow.parquet as pq

            return list(pq.read_schema(path).names)
        with open(path, encoding="utf-8") as handle:
            first = next((line for line in handle if line.strip()), "")
        if builder == "csv":
            return next(csv.reader([first], delimiter="\t" if path.endswith(".tsv") else ","), None)
        return list(json.loads(first)) if first.lstrip().startswith("{") else None
    except (OSError, ValueError):
        return None


def _root_cause(err: BaseException) -> str:
    """The innermost exception behind ``err``, as ``Type: message``."""
    while (err.__cause__ or err.__context__) is not None:
        err = err.__cause__ or err.__context__
    return f"{type(err).__name__}: {err}"


def _has_rows(path: str, builder: str) -> bool:
    """Whether a local data file holds at least one row (``datasets`` fails on empty files)."""
    if builder == "parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows > 0
    with open(path, encoding="utf-8", errors="replace") as handle:
        lines = [line for line in handle if line.strip()]
    if builder == "csv":
        return len(lines) > 1  # a header and at least one row
    return bool(lines) and "".join(lines).strip() != "[]"


def _digest(*parts: Any) -> str:
    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:32]


def _map_rows(data: Any, encode: Any, fingerprint: str, desc: str, with_indices: bool = True) -> Any:
    """``data`` with its columns replaced by those ``encode`` returns for batches of rows (and
    their indices when ``with_indices``), cached by ``datasets`` under ``fingerprint``."""
    return data.map(
        encode,
        batched=True,
        with_indices=with_indices,
        remove_columns=data.column_names,
        new_fingerprint=fingerprint,
        desc=desc,
    )


def _column(data: Any, name: str) -> Any:
    """One column as a pyarrow array (respects ``select``; no cache file is written)."""
    return data.with_format("arrow")[name]


class TextClassificationDataModule(pl.LightningDataModule):
    """Tokenised, dynamically padded batches of texts (or text pairs) with labels.

    The data comes from one of:

    - ``dataset``: a packaged offline set (``packaged/rotten_tomatoes``, ``packaged/imdb``,
      ``packaged/amazon_snippets``, ``packaged/amazon_snippets_3class``) or a hub data set
      name (with ``dataset_config`` and ``revision``);
    - ``data_files``: local ``csv``/``tsv``/``json``(lines)/``parquet`` files, a mapping
      split -> path(s), or one path (then validation and test are carved from it).

    Splits missing from the source are carved from ``train`` with ``split_seed``; the splits
    used are written to ``data_splits.json`` in the run directory. Tokenisation runs through
    ``datasets.map`` under a fingerprint of the data, the tokenizer and the settings, so a
    second run with the same settings loads the tokenised cache instead of tokenising again.

    Labels are class indices (integers, strings mapped through ``label_names``, a
    ``ClassLabel``, or raw values mapped through ``label_map``), or float scores when
    ``regression`` is set (one output, MSE; STS-B).

    A data module brings its task's metrics (:meth:`task_metrics`) and the validation metric
    a checkpoint should follow (:attr:`monitor`, :attr:`monitor_mode`); the kd_lightning
    modules evaluate with them when attached to it.

    Args:
        text_column / text_pair_column: the text (and optional second text) columns.
        label_column: the label column.
        label_names: class names in index order; string labels are mapped through them.
        label_map: raw label value -> class index, e.g. ``{0: 0, 4: 1}`` (Sentiment140).
        drop_labels: raw label values whose rows are removed before use (e.g. a neutral class).
        regression: float targets and one output (``num_labels = 1``).
        split_names: our split -> the source's split name, e.g. ``{validation: dev}``; several
            of our splits may name the same source split.
        validation_fraction / test_fraction: shares of ``train`` carved off when missing.
        split_seed: seed of the carving (and of the packaged sets' splits).
        revision: hub revision (branch, tag or commit) of a hub data set.
        tokenizer: a tokenizer name or folder; default: the model's (``module.tokenizer``).
        max_length: truncation length in tokens.
        max_train_samples / max_eval_samples: keep N rows of the split, drawn at random with
            ``split_seed`` and kept in the split's order (quick runs).
        batch_size / eval_batch_size: rows per batch (evaluation defaults to ``2 * batch_size``).
        group_by_length: batch training rows of similar length (less padding), see
            :class:`~kd_lightning.data.sampling.LengthGroupedBatchSampler`.
        length_group_size: batches per length-sorted group when ``group_by_length``.
        shuffle_seed: seed of the training order (default: the global seed, ``torch.initial_seed()``,
            which ``seed_everything`` sets). The order of epoch ``e`` is a function of this seed
            and ``e`` alone, and the seed is kept in checkpoints, so a run resumed mid-epoch
            reads the rest of the epoch exactly as an uninterrupted run (see
            :class:`~kd_lightning.data.sampling.ResumableDataLoader`).
        num_workers: DataLoader worker processes.
        pad_to_multiple_of: pad each batch to a multiple of this many tokens (dynamic padding
            otherwise pads to the batch's longest row). Fewer distinct batch shapes: one CUDA
            graph per shape with ``teacher_cuda_graphs``, and tensor-core-friendly lengths
            (8 for float16/bfloat16). ``max_length`` must be a multiple of it. Padding is
            masked, so the models' outputs on the real tokens do not change.
    """

    #: The offline sets ``dataset: packaged/<name>`` may name (task data modules have their own).
    packaged_sets: Mapping[str, Any] = PACKAGED_DATASETS
    #: What the data is called in messages (``cannot load the <data_kind> ...``).
    data_kind: str = "data set"

    def __init__(
        self,
        dataset: str | None = None,
        dataset_config: str | None = None,
        data_files: str | dict[str, str | list[str]] | None = None,
        text_column: str = "text",
        text_pair_column: str | None = None,
        label_column: str = "label",
        label_names: list[str] | None = None,
        label_map: dict[str | int, int] | None = None,
        drop_labels: list[str | int] | None = None,
        regression: bool = False,
        split_names: dict[str, str] | None = None,
        validation_fraction: float = 0.1,
        test_fraction: float = 0.1,
        split_seed: int = 0,
        revision: str | None = None,
        tokenizer: str | None = None,
        max_length: int = 128,
        max_train_samples: int | None = None,
        max_eval_samples: int | None = None,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        group_by_length: bool = False,
        length_group_size: int = 50,
        shuffle_seed: int | None = None,
        num_workers: int = 0,
        pad_to_multiple_of: int | None = None,
    ) -> None:
        super().__init__()
        if (dataset is None) == (data_files is None):
            raise ValueError("give exactly one of `dataset` (a packaged or hub name) and `data_files` (local files)")
        if regression and (label_names or label_map):
            raise ValueError("regression data has float scores: label_names and label_map do not apply")
        sizes = {"batch_size": batch_size, "eval_batch_size": eval_batch_size, "max_length": max_length, "pad_to_multiple_of": pad_to_multiple_of}
        for argument, value in sizes.items():
            if value is not None and not (isinstance(value, int) and value > 0):
                raise ValueError(f"{argument} must be a positive integer, got {value!r}: set data.init_args.{argument} to 1 or more")
        if pad_to_multiple_of is not None and max_length % pad_to_multiple_of:
            raise ValueError(
                f"max_length {max_length} is not a multiple of pad_to_multiple_of {pad_to_multiple_of}: padded batches "
                f"would outgrow max_length; set max_length to {max_length - max_length % pad_to_multiple_of or pad_to_multiple_of} "
                f"or {max_length + pad_to_multiple_of - max_length % pad_to_multiple_of}"
            )
        if dataset is not None and dataset.startswith("packaged/") and dataset not in self.packaged_sets:
            raise ValueError(
                f"unknown packaged data set {dataset!r}{did_you_mean(dataset, self.packaged_sets)}; "
                f"the packaged sets are {', '.join(self.packaged_sets)}"
            )
        self.dataset_name = dataset
        self.dataset_config = dataset_config
        self.data_files = data_files
        self.text_column = text_column
        self.text_pair_column = text_pair_column
        self.label_column = label_column
        self.label_names = list(label_names) if label_names is not None else None
        self.label_map = dict(label_map) if label_map is not None else None
        self.drop_labels = list(drop_labels or [])
        self.regression = regression
        self.split_names = dict(split_names or {})
        self.validation_fraction = validation_fraction
        self.test_fraction = test_fraction
        self.split_seed = split_seed
        self.revision = revision
        self.tokenizer_name = tokenizer
        self.max_length = max_length
        self.max_train_samples = max_train_samples
        self.max_eval_samples = max_eval_samples
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or 2 * batch_size
        self.group_by_length = group_by_length
        self.length_group_size = length_group_size
        self.shuffle_seed = shuffle_seed
        self._training_order_seed: int | None = None
        self.num_workers = num_workers
        self.pad_to_multiple_of = pad_to_multiple_of
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.datasets: dict[str, Any] = {}
        self.num_labels: int | None = 1 if regression else None
        self.split_record: dict[str, Any] = {}

    # ---- the task --------------------------------------------------------------------------------
    @property
    def is_regression(self) -> bool:
        """Float targets and a one-output head (MSE) rather than classes."""
        return self.regression

    def task_metrics(self) -> MetricCollection:
        """The metrics of this task: accuracy, macro F1 and ECE for classes; Pearson,
        Spearman and MSE for scores. Needs ``num_labels``, known after :meth:`setup`."""
        if self.is_regression:
            return regression_metrics()
        if self.num_labels is None:
            raise RuntimeError("task_metrics() needs the number of classes: call setup() first")
        return classification_metrics(self.num_labels)

    @property
    def monitor(self) -> str:
        """The validation metric that selects the best checkpoint."""
        return "val/mse" if self.is_regression else "val/acc"

    @property
    def monitor_mode(self) -> str:
        """``max`` or ``min``: which way :attr:`monitor` improves."""
        return "min" if self.is_regression else "max"

    # ---- loading -------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        if self.dataset_name in self.packaged_sets:
            self._materialize()

    def _materialize(self) -> Path:
        """Write (once) the seeded splits of the packaged set ``dataset``; returns their folder."""
        return materialize_packaged(
            self.dataset_name, self.split_seed, self.validation_fraction, self.test_fraction, self.packaged_sets
        )

    def load_raw(self) -> Any:
        """The source splits as a ``datasets.DatasetDict`` (before carving, labels or tokens)."""
        import datasets

        if self.dataset_name in self.packaged_sets:
            folder = self._materialize()
            self.split_record = json.loads((folder / "splits.json").read_text())
            packaged_names = self.packaged_sets[self.dataset_name].label_names
            if packaged_names:  # the task sets (instructions, retrieval pairs) have none
                self.label_names = self.label_names or list(packaged_names)
            files = {split: str(folder / f"{split}.parquet") for split in SPLITS}
            return datasets.load_dataset("parquet", data_files=files)
        if self.data_files is not None:
            files = self.data_files if isinstance(self.data_files, Mapping) else {"train": self.data_files}
            files = {split: [p] if isinstance(p, str) else list(p) for split, p in files.items()}
            builder = file_format([p for paths in files.values() for p in paths])
            kwargs = {"delimiter": "\t"} if builder == "csv" and all(p.endswith(".tsv") for ps in files.values() for p in ps) else {}
            try:
                return datasets.load_dataset(builder, data_files=files, **kwargs)
            except Exception as err:
                for split, paths in files.items():
                    for path in paths:
                        problem = _unreadable(path, builder)
                        if problem:
                            raise ValueError(
                                f"cannot read the {split} file {path!r} as {builder}: it is {problem}. Re-export it as "
                                f"{builder}, or give it the extension of its real format ({', '.join(FILE_FORMATS)})"
                            ) from err
                empty = [split for split, paths in files.items() if not any(_has_rows(p, builder) for p in paths)]
                if empty:
                    raise ValueError(
                        f"the {empty[0]} split is empty: {files[empty[0]]} has no rows. Give a file with a header "
                        "line and at least one row"
                    ) from err
                columns = {path: _file_columns(path, builder) for paths in files.values() for path in paths}
                if len({tuple(c) for c in columns.values() if c is not None}) > 1:
                    shown = "; ".join(f"{path}: {names}" for path, names in columns.items())
                    raise ValueError(
                        f"the data files do not share their columns ({shown}). Give every file the same columns, "
                        f"with the text in {self.text_column!r} and the labels in {self.label_column!r}"
                    ) from err
                raise ValueError(
                    f"cannot read data files {files} as {builder}: {_root_cause(err)}. Check that every file is valid "
                    f"{builder} with the same columns"
                ) from err
        kwargs = {"revision": self.revision} if self.revision else {}
        try:
            return datasets.load_dataset(self.dataset_name, self.dataset_config, **kwargs)
        except Exception as err:
            raise ValueError(
                f"cannot load the {self.data_kind} {self.dataset_name!r}"
                f"{f' ({self.dataset_config})' if self.dataset_config else ''} from the hub: {err}. "
                f"Offline, use {self._offline_choices()}"
            ) from err

    def _offline_choices(self) -> str:
        """What to use instead of a hub data set that cannot be loaded (the end of the error message)."""
        return f"a packaged set ({', '.join(self.packaged_sets)}) or data_files with local files in the same schema."

    def _named_splits(self, raw: Any) -> dict[str, Any]:
        """Our three splits, carving validation/test from train when the source lacks them."""
        present = {split: raw[self.split_names.get(split, split)] for split in SPLITS if self.split_names.get(split, split) in raw}
        if "train" not in present:
            raise ValueError(f"the data has no train split (splits: {list(raw)}); map one with split_names: {{train: <name>}}")
        missing = [f"{ours} -> {theirs}" for ours, theirs in self.split_names.items() if theirs not in raw]
        if missing:
            raise ValueError(f"split_names name source splits that do not exist: {missing}; the source has {list(raw)}")
        carved: dict[str, list[int]] = {}
        to_carve = [(s, f) for s, f in (("test", self.test_fraction), ("validation", self.validation_fraction)) if s not in present]
        if to_carve:  # ``_row``: each row's position in the source's train split, for the record
            present["train"] = present["train"].add_column("_row", list(range(len(present["train"]))))
        for split, fraction in to_carve:
            train = present["train"]
            try:
                parts = train.train_test_split(test_size=fraction, seed=self.split_seed)
            except ValueError as err:
                raise ValueError(
                    f"cannot carve a {split} split of fraction {fraction} from a train split of {len(train)} rows ({err}). "
                    f"Give a {split} file/split, or change {split}_fraction."
                ) from err
            present["train"], present[split] = parts["train"], parts["test"]
            carved[split] = sorted(int(i) for i in _column(present[split], "_row").to_pylist())
        present = {k: v.remove_columns("_row") if "_row" in v.column_names else v for k, v in present.items()}
        if carved:
            self.split_record.setdefault("carved_from_train", {}).update(carved)
            self.split_record["seed"] = self.split_seed
        self.split_record["source_splits"] = {split: self.split_names.get(split, split) for split in SPLITS if split not in carved}
        return present

    def _check_columns(self, split: str, data: Any) -> None:
        needed = [c for c in (self.text_column, self.text_pair_column, self.label_column) if c]
        missing = [c for c in needed if c not in data.column_names]
        if missing:
            raise ValueError(
                f"the {split} split has no column(s) {missing}; its columns are {data.column_names}. "
                "Set text_column / text_pair_column / label_column to the right names."
            )
        if len(data) == 0:
            raise ValueError(f"the {split} split is empty: check the files, split_names, drop_labels or max_*_samples")

    def _check_missing_labels(self, split: str, data: Any) -> None:
        """Rows without a label (an empty cell, null or NaN) fail with their positions."""
        import pyarrow.compute as pc

        missing = pc.is_null(_column(data, self.label_column), nan_is_null=True)
        count = pc.sum(missing).as_py() or 0
        if count:
            rows = [i for i, flag in enumerate(missing.to_pylist()) if flag][:5]
            raise ValueError(
                f"the {split} split has {count} row(s) without a label (an empty cell, null or NaN), e.g. 0-based "
                f"row(s) {rows}: fill in their labels, or remove those rows"
            )

    def _drop_rows(self, split: str, data: Any) -> Any:
        """Remove the rows whose raw label is in ``drop_labels``."""
        if not self.drop_labels:
            return data
        drop, column = set(self.drop_labels), self.label_column
        return data.filter(
            lambda labels: [value not in drop for value in labels],
            input_columns=column,
            batched=True,
            new_fingerprint=_digest(data._fingerprint, "drop", column, sorted(map(str, drop))),
            desc=f"Dropping labels {sorted(map(str, drop))} from {split}",
        )

    def _label_mapping(self, train: Any) -> dict[Any, int] | None:
        """Raw label -> index, or None when labels are used as they are; sets ``num_labels``."""
        import datasets

        feature = train.features[self.label_column]
        if self.regression:
            if not (isinstance(feature, datasets.Value) and (feature.dtype.startswith(("float", "int")))):
                raise ValueError(f"regression needs numeric scores, but the label column {self.label_column!r} is {feature}")
            return None
        if self.label_map is not None:
            indices = sorted(set(self.label_map.values()))
            self.num_labels = len(self.label_names) if self.label_names else indices[-1] + 1
            if indices[0] < 0 or indices[-1] >= self.num_labels:
                raise ValueError(f"label_map {self.label_map} maps to indices outside 0..{self.num_labels - 1}")
            return dict(self.label_map)
        if isinstance(feature, datasets.ClassLabel):
            if self.label_names is not None and len(self.label_names) != feature.num_classes:
                raise ValueError(f"label_names has {len(self.label_names)} names but the data has {feature.num_classes} classes: {feature.names}")
            self.label_names = self.label_names or list(feature.names)
            self.num_labels = feature.num_classes
            return None
        values = _column(train, self.label_column).unique().to_pylist()
        if any(isinstance(v, str) for v in values):
            self.label_names = self.label_names or sorted(str(v) for v in values)
            self.num_labels = len(self.label_names)
            return {name: i for i, name in enumerate(self.label_names)}
        if any(v is not None and not float(v).is_integer() for v in values):
            raise ValueError(
                f"the label column {self.label_column!r} holds non-integer numbers {sorted(v for v in values if v is not None)[:5]}...: "
                "set regression: true for scores, or give class indices"
            )
        ints = [int(v) for v in values if v is not None]
        self.num_labels = len(self.label_names) if self.label_names else max(ints, default=0) + 1
        return None

    def _check_labels(self, split: str, data: Any, mapping: dict[Any, int] | None) -> None:
        values = _column(data, self.label_column).unique().to_pylist()
        if self.regression:
            bad = [v for v in values if v is None or not math.isfinite(v)]
            allowed = "finite numbers"
        elif mapping is not None:
            bad = [v for v in values if v not in mapping]
            allowed = list(mapping)
        else:
            bad = [v for v in values if not (isinstance(v, int) and 0 <= v < self.num_labels)]
            allowed = f"integers 0..{self.num_labels - 1}"
        if bad:
            raise ValueError(
                f"the {split} split has labels {sorted(map(str, bad))[:10]} outside the label set ({allowed}). "
                "Fix the data, set label_names / label_map to the full list of classes, or list values to "
                "remove in drop_labels."
            )

    # ---- tokenisation --------------------------------------------------------------------------
    def _tokenizer_key(self) -> str:
        """A hash of what the tokenizer does. A fast tokenizer's serialisation also holds the
        truncation/padding state its last call left behind: that is left out, so the key (and
        the tokenised cache) does not change once the tokenizer has been used."""
        tok = self.tokenizer
        backend = getattr(tok, "backend_tokenizer", None)
        if backend is not None:
            state = json.loads(backend.to_str())
            state.pop("truncation", None)
            state.pop("padding", None)
            body = json.dumps(state, sort_keys=True)
        else:
            body = json.dumps(sorted(tok.get_vocab().items()))
        return hashlib.sha256(f"{type(tok).__name__}|{body}".encode()).hexdigest()[:16]

    def _tokenize(self, split: str, data: Any, mapping: dict[Any, int] | None) -> Any:
        tokenizer, text, pair, label = self.tokenizer, self.text_column, self.text_pair_column, self.label_column
        max_length, regression = self.max_length, self.regression

        def encode(rows: dict[str, list[Any]], indices: list[int]) -> dict[str, Any]:
            texts = [t if t is not None else "" for t in rows[text]]
            pairs = [t if t is not None else "" for t in rows[pair]] if pair else None
            encoded = dict(tokenizer(texts, pairs, truncation=True, max_length=max_length))
            if regression:
                encoded["labels"] = [float(v) for v in rows[label]]
            else:
                encoded["labels"] = [mapping[v] for v in rows[label]] if mapping is not None else rows[label]
            encoded["index"] = indices
            return encoded

        fingerprint = _digest(data._fingerprint, self._tokenizer_key(), text, pair, label, mapping, regression, max_length)
        return _map_rows(data, encode, fingerprint, f"Tokenising {split}")

    def _checked_splits(self) -> dict[str, Any]:
        """Our three splits of the source (:meth:`load_raw`, :meth:`_named_splits`), each with its
        columns checked; the tokenizer is resolved first."""
        if self.tokenizer is None:
            self.tokenizer = self._resolve_tokenizer()
        splits = self._named_splits(self.load_raw())
        for split, data in splits.items():
            self._check_columns(split, data)
        return splits

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        splits = self._checked_splits()
        splits = {split: self._drop_rows(split, data) for split, data in splits.items()}
        for split, data in splits.items():
            self._check_missing_labels(split, data)
        mapping = self._label_mapping(splits["train"])
        for split, data in splits.items():
            data = self._subset(split, data)
            self._check_columns(split, data)
            self._check_labels(split, data, mapping)
            self.datasets[split] = self._tokenize(split, data, mapping)
        self.split_record["sizes_used"] = {split: len(d) for split, d in self.datasets.items()}
        self.split_record["label_names"] = self.label_names
        self._record_splits()

    def _subset(self, split: str, data: Any) -> Any:
        """``data`` cut to ``max_train_samples`` (train) or ``max_eval_samples`` rows: a seeded
        random subset, kept in the split's order (sources sorted by label or task would give a
        first-N subset of one kind)."""
        limit = self.max_train_samples if split == "train" else self.max_eval_samples
        if limit is None or limit >= len(data):
            return data
        keep = np.sort(np.random.default_rng(self.split_seed).permutation(len(data))[:limit])
        return data.select(keep.tolist())

    def _resolve_tokenizer(self) -> PreTrainedTokenizerBase:
        if self.tokenizer_name is not None:
            from kd_lightning.models import load_tokenizer

            return load_tokenizer(self.tokenizer_name)
        module = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
        tokenizer = getattr(module, "tokenizer", None)
        if tokenizer is None:
            raise ValueError("the data module has no tokenizer: set data tokenizer: <name or folder>, or attach it to a kd_lightning module")
        return tokenizer

    def _record_splits(self) -> None:
        log_dir = getattr(self.trainer, "log_dir", None) if self.trainer is not None else None
        if log_dir and getattr(self.trainer, "is_global_zero", True):
            os.makedirs(log_dir, exist_ok=True)
            with open(os.path.join(log_dir, "data_splits.json"), "w") as handle:
                json.dump(self.split_record, handle)

    # ---- loaders -------------------------------------------------------------------------------
    def collator(self) -> Any:
        """What makes a batch of tokenised rows: dynamic padding of the tokenizer fields (to a
        multiple of ``pad_to_multiple_of`` when set)."""
        return DataCollatorWithPadding(self.tokenizer, pad_to_multiple_of=self.pad_to_multiple_of)

    def _loader(self, split: str, batch_size: int, shuffle: bool) -> DataLoader:
        data = self.datasets[split].with_format("torch")
        if self.num_workers > 0:
            # The fast tokenizer's thread pool does not survive fork; the collator only pads.
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        common = {
            "collate_fn": self.collator(),
            "num_workers": self.num_workers,
            "persistent_workers": self.num_workers > 0,
        }
        if not shuffle:
            return DataLoader(data, batch_size=batch_size, **common)
        seed = self.training_order_seed()
        rows = EpochRandomSampler(data, seed=seed)
        if self.group_by_length:
            import pyarrow.compute as pc

            lengths = pc.list_value_length(_column(self.datasets[split], "input_ids")).to_numpy()
            batches: ResumableBatchSampler = LengthGroupedBatchSampler(
                rows, batch_size, drop_last=False, lengths=lengths, group_size=self.length_group_size, seed=seed
            )
        else:
            batches = ResumableBatchSampler(rows, batch_size, drop_last=False)
        return ResumableDataLoader(data, batch_sampler=batches, **common)

    def training_order_seed(self) -> int:
        """The seed of the training order: ``shuffle_seed``, else the global seed
        (``torch.initial_seed()``); fixed at the first call and kept in checkpoints."""
        if self._training_order_seed is None:
            self._training_order_seed = self.shuffle_seed if self.shuffle_seed is not None else torch.initial_seed() % 2**63
        return self._training_order_seed

    def state_dict(self) -> dict[str, Any]:
        """What checkpoints keep of the data module: the seed of the training order, so a
        resumed run shuffles every epoch as the interrupted run did (the position within the
        epoch is the training loader's own state, which Lightning saves beside)."""
        return {} if self._training_order_seed is None else {"training_order_seed": self._training_order_seed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Take the checkpoint's training-order seed (over ``shuffle_seed``: the resumed run
        continues the interrupted one)."""
        if "training_order_seed" in state_dict:
            self._training_order_seed = int(state_dict["training_order_seed"])

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation", self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.eval_batch_size, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()

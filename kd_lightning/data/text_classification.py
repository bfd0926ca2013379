"""``TextClassificationDataModule``: single texts or text pairs with class labels, on HF ``datasets``."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase

from kd_lightning.data.packaged import PACKAGED_DATASETS, materialize_packaged

SPLITS = ("train", "validation", "test")
FILE_FORMATS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def file_format(paths: list[str]) -> str:
    """The ``datasets`` builder (csv/json/parquet) for local files, from their extension."""
    formats = set()
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"data file {path!r} does not exist (working directory: {os.getcwd()})")
        suffix = Path(path).suffix.lower()
        if suffix not in FILE_FORMATS:
            raise ValueError(f"data file {path!r}: unknown format {suffix!r}; use one of {', '.join(FILE_FORMATS)}")
        formats.add(FILE_FORMATS[suffix])
    if len(formats) != 1:
        raise ValueError(f"data files mix formats {sorted(formats)}: give files of one format")
    return formats.pop()


class TextClassificationDataModule(pl.LightningDataModule):
    """Tokenised, dynamically padded text-classification batches.

    The data comes from one of:

    - ``dataset``: a packaged offline set (``packaged/rotten_tomatoes``, ``packaged/imdb``) or
      a hub data set name (with ``dataset_config``);
    - ``data_files``: local ``csv``/``tsv``/``json``(lines)/``parquet`` files, a mapping
      split -> path(s), or one path (then validation and test are carved from it).

    Splits missing from the source are carved from ``train`` with ``split_seed``; the splits
    used are written to ``data_splits.json`` in the run directory. Tokenisation runs through
    ``datasets.map`` with a fingerprint of the data, the tokenizer and the settings, so a second
    run reuses the cached result.

    Args:
        text_column / text_pair_column: the text (and optional second text) columns.
        label_column: the label column (integers, strings, or a ``ClassLabel``).
        label_names: class names in index order; string labels are mapped through them.
        split_names: our split -> the source's split name, e.g. ``{validation: dev}``.
        validation_fraction / test_fraction: shares of ``train`` carved off when missing.
        tokenizer: a tokenizer name or folder; default: the model's (``module.tokenizer``).
        max_length: truncation length in tokens.
        max_train_samples / max_eval_samples: keep only the first N rows (quick runs).
        batch_size / eval_batch_size: rows per batch (evaluation defaults to ``2 * batch_size``).
        num_workers: DataLoader worker processes.
    """

    def __init__(
        self,
        dataset: str | None = None,
        dataset_config: str | None = None,
        data_files: str | dict[str, str | list[str]] | None = None,
        text_column: str = "text",
        text_pair_column: str | None = None,
        label_column: str = "label",
        label_names: list[str] | None = None,
        split_names: dict[str, str] | None = None,
        validation_fraction: float = 0.1,
        test_fraction: float = 0.1,
        split_seed: int = 0,
        tokenizer: str | None = None,
        max_length: int = 128,
        max_train_samples: int | None = None,
        max_eval_samples: int | None = None,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if (dataset is None) == (data_files is None):
            raise ValueError("give exactly one of `dataset` (a packaged or hub name) and `data_files` (local files)")
        self.dataset_name = dataset
        self.dataset_config = dataset_config
        self.data_files = data_files
        self.text_column = text_column
        self.text_pair_column = text_pair_column
        self.label_column = label_column
        self.label_names = list(label_names) if label_names is not None else None
        self.split_names = dict(split_names or {})
        self.validation_fraction = validation_fraction
        self.test_fraction = test_fraction
        self.split_seed = split_seed
        self.tokenizer_name = tokenizer
        self.max_length = max_length
        self.max_train_samples = max_train_samples
        self.max_eval_samples = max_eval_samples
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or 2 * batch_size
        self.num_workers = num_workers
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.datasets: dict[str, Any] = {}
        self.num_labels: int | None = None
        self.split_record: dict[str, Any] = {}

    # ---- loading -------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        if self.dataset_name in PACKAGED_DATASETS:
            materialize_packaged(self.dataset_name, self.split_seed, self.validation_fraction, self.test_fraction)

    def load_raw(self) -> Any:
        """The source splits as a ``datasets.DatasetDict`` (before carving, labels or tokens)."""
        import datasets

        if self.dataset_name in PACKAGED_DATASETS:
            folder = materialize_packaged(self.dataset_name, self.split_seed, self.validation_fraction, self.test_fraction)
            self.split_record = json.loads((folder / "splits.json").read_text())
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
                raise ValueError(f"cannot read data files {files} as {builder}: {err}") from err
        try:
            return datasets.load_dataset(self.dataset_name, self.dataset_config)
        except Exception as err:
            raise ValueError(
                f"cannot load the data set {self.dataset_name!r}"
                f"{f' ({self.dataset_config})' if self.dataset_config else ''} from the hub: {err}. "
                f"Offline, use a packaged set ({', '.join(PACKAGED_DATASETS)}) or data_files with local files."
            ) from err

    def _named_splits(self, raw: Any) -> dict[str, Any]:
        """Our three splits, carving validation/test from train when the source lacks them."""
        present = {split: raw[self.split_names.get(split, split)] for split in SPLITS if self.split_names.get(split, split) in raw}
        if "train" not in present:
            raise ValueError(f"the data has no train split (splits: {list(raw)}); map one with split_names: {{train: <name>}}")
        carved: dict[str, list[int]] = {}
        for split, fraction in (("test", self.test_fraction), ("validation", self.validation_fraction)):
            if split in present:
                continue
            parts = present["train"].add_column("_row", list(range(len(present["train"])))).train_test_split(
                test_size=fraction, seed=self.split_seed
            )
            present["train"], present[split] = parts["train"], parts["test"]
            carved[split] = [int(i) for i in present[split]["_row"]]
            present = {k: v.remove_columns("_row") if "_row" in v.column_names else v for k, v in present.items()}
        if carved:
            self.split_record.setdefault("carved_from_train", {}).update(carved)
            self.split_record["seed"] = self.split_seed
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
            raise ValueError(f"the {split} split is empty: check the files, split_names, or max_*_samples")

    def _label_mapping(self, train: Any) -> dict[Any, int] | None:
        """String label -> index, or None for integer labels; sets ``num_labels``."""
        import datasets

        feature = train.features[self.label_column]
        if isinstance(feature, datasets.ClassLabel):
            if self.label_names is not None and len(self.label_names) != feature.num_classes:
                raise ValueError(f"label_names has {len(self.label_names)} names but the data has {feature.num_classes} classes: {feature.names}")
            self.label_names = self.label_names or list(feature.names)
            self.num_labels = feature.num_classes
            return None
        values = train.unique(self.label_column)
        if any(isinstance(v, str) for v in values):
            self.label_names = self.label_names or sorted(values)
            self.num_labels = len(self.label_names)
            return {name: i for i, name in enumerate(self.label_names)}
        self.num_labels = len(self.label_names) if self.label_names else int(max(values)) + 1
        return None

    def _check_labels(self, split: str, data: Any, mapping: dict[Any, int] | None) -> None:
        values = data.unique(self.label_column)
        if mapping is not None:
            bad = [v for v in values if v not in mapping]
            allowed = list(mapping)
        else:
            bad = [v for v in values if not (isinstance(v, int) and 0 <= v < self.num_labels)]
            allowed = f"integers 0..{self.num_labels - 1}"
        if bad:
            raise ValueError(
                f"the {split} split has labels {sorted(map(str, bad))[:10]} outside the label set ({allowed}). "
                "Fix the data, or set label_names to the full list of classes."
            )

    # ---- tokenisation --------------------------------------------------------------------------
    def _tokenizer_key(self) -> str:
        tok = self.tokenizer
        backend = getattr(tok, "backend_tokenizer", None)
        body = backend.to_str() if backend is not None else json.dumps(sorted(tok.get_vocab().items()))
        return hashlib.sha256(f"{type(tok).__name__}|{body}".encode()).hexdigest()[:16]

    def _tokenize(self, split: str, data: Any, mapping: dict[Any, int] | None) -> Any:
        tokenizer, text, pair, label = self.tokenizer, self.text_column, self.text_pair_column, self.label_column
        max_length = self.max_length

        def encode(rows: dict[str, list[Any]], indices: list[int]) -> dict[str, Any]:
            texts = [t if t is not None else "" for t in rows[text]]
            pairs = [t if t is not None else "" for t in rows[pair]] if pair else None
            encoded = dict(tokenizer(texts, pairs, truncation=True, max_length=max_length))
            encoded["labels"] = [mapping[v] for v in rows[label]] if mapping is not None else rows[label]
            encoded["index"] = indices
            return encoded

        settings = f"{data._fingerprint}|{self._tokenizer_key()}|{text}|{pair}|{label}|{mapping}|{max_length}"
        fingerprint = hashlib.sha256(settings.encode()).hexdigest()[:32]
        return data.map(
            encode,
            batched=True,
            with_indices=True,
            remove_columns=data.column_names,
            new_fingerprint=fingerprint,
            desc=f"Tokenising {split}",
        )

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        if self.tokenizer is None:
            self.tokenizer = self._resolve_tokenizer()
        splits = self._named_splits(self.load_raw())
        for split, data in splits.items():
            self._check_columns(split, data)
        mapping = self._label_mapping(splits["train"])
        for split, data in splits.items():
            limit = self.max_train_samples if split == "train" else self.max_eval_samples
            if limit is not None:
                data = data.select(range(min(limit, len(data))))
                self._check_columns(split, data)
            self._check_labels(split, data, mapping)
            self.datasets[split] = self._tokenize(split, data, mapping)
        self.split_record["sizes_used"] = {split: len(d) for split, d in self.datasets.items()}
        self.split_record["label_names"] = self.label_names
        self._record_splits()

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
    def _loader(self, split: str, batch_size: int, shuffle: bool) -> DataLoader:
        data = self.datasets[split].with_format("torch")
        return DataLoader(
            data,
            batch_size=batch_size,
            shuffle=shuffle,
            collate_fn=DataCollatorWithPadding(self.tokenizer),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation", self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.eval_batch_size, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()

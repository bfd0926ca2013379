"""``RetrievalDataModule``: (query, relevant document) pairs for dual encoders; recall@k (:mod:`kd_lightning.metrics.retrieval`) over a split's documents.

Each example is a query and one document relevant to it (a question and its answer, an
instruction and its output). Queries and documents are tokenised separately (each with its own
length limit) and batched side by side, so that the ``n`` documents of a batch serve as the
in-batch negatives of each other's queries. Every row also carries ids that name its query and
its document by text within the split (``query_id``, ``document_id``): the same document paired
with several queries (FAQ answers) is one document, never a negative of itself, and recall@k ranks
each distinct query against each distinct document of the split.

Two offline sets are built from the packaged instruction data
(:mod:`~kd_lightning.data.instruction_sources`):

- ``packaged/chatterbot_qa``: the consecutive-turn pairs of chatterbot-corpus's English
  conversations (BSD) as (question, answer): 2,361 of its 2,393 pairs, the 32 with an empty
  side left out;
- ``packaged/alpaca_eval_qa``: AlpacaEval's 805 (instruction, reference output) pairs.

Both are split once with a seeded generator by query text (a question asked in several
conversations stays in one split), like the other packaged sets.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from torch import Tensor
from torchmetrics import MetricCollection
from transformers import PreTrainedTokenizerBase
from transformers.data.data_collator import pad_without_fast_tokenizer_warning

from kd_lightning.data.instruction_sources import PACKAGED_INSTRUCTION_SETS
from kd_lightning.data.text_classification import TextClassificationDataModule, _column, _digest, _map_rows
from kd_lightning.metrics.retrieval import RecallAtK, check_cutoffs, retrieval_metrics
from kd_lightning.suggestions import did_you_mean

SIDES = ("query", "document")
ENCODER_FIELDS = ("input_ids", "attention_mask", "token_type_ids")


# ---- packaged offline sets ---------------------------------------------------------------------------
@dataclass(frozen=True)
class QuestionAnswerPairs:
    """A packaged instruction set's (instruction, output) examples as (query, document) pairs.

    Pairs with an empty query or document are left out; pairs that share their query text
    (case and surrounding spaces ignored) form one group, so they land in one split.
    """

    source: Any
    label_names: tuple[str, ...] = ()

    def source_file(self) -> str:
        return self.source.source_file()

    def frame(self, path: str) -> pd.DataFrame:
        rows = self.source.frame(path)
        query, document = rows["instruction"].astype(str).str.strip(), rows["output"].astype(str).str.strip()
        keep = (query != "") & (document != "")
        frame = pd.DataFrame({"query": query, "document": document, "row_id": rows["row_id"]})
        if "category" in rows:
            frame["category"] = rows["category"]
        frame["group"] = query.str.casefold()
        return frame[keep].reset_index(drop=True)


PACKAGED_RETRIEVAL_SETS: dict[str, QuestionAnswerPairs] = {
    "packaged/chatterbot_qa": QuestionAnswerPairs(PACKAGED_INSTRUCTION_SETS["packaged/chatterbot"]),
    "packaged/alpaca_eval_qa": QuestionAnswerPairs(PACKAGED_INSTRUCTION_SETS["packaged/alpaca_eval"]),
}


# ---- batches ---------------------------------------------------------------------------------------
@dataclass
class RetrievalCollator:
    """Pads queries and documents separately: ``query_input_ids``, ``query_attention_mask``
    (``query_token_type_ids`` when the tokenizer gives them), the same with ``document_``, and
    ``query_id``, ``document_id``, ``index`` (the row in its split)."""

    tokenizer: PreTrainedTokenizerBase

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Tensor]:
        batch: dict[str, Tensor] = {}
        for side in SIDES:
            fields = [{f: row[f"{side}_{f}"] for f in ENCODER_FIELDS if f"{side}_{f}" in row} for row in rows]
            padded = pad_without_fast_tokenizer_warning(self.tokenizer, fields, padding=True, return_tensors="pt")
            batch.update({f"{side}_{name}": value for name, value in padded.items()})
        for key in ("query_id", "document_id", "index"):
            batch[key] = torch.as_tensor([int(row[key]) for row in rows])
        return batch


def side_inputs(batch: Mapping[str, Any], side: str) -> dict[str, Tensor]:
    """The encoder inputs of one side (``query`` or ``document``) of a retrieval batch."""
    return {f: batch[f"{side}_{f}"] for f in ENCODER_FIELDS if f"{side}_{f}" in batch}


class RetrievalDataModule(TextClassificationDataModule):
    """(query, relevant document) pairs for dual encoders: separate tokenisation, in-batch
    negatives, seeded splits, recall@k (see the module docstring).

    The data comes from one of:

    - ``dataset``: ``packaged/chatterbot_qa`` or ``packaged/alpaca_eval_qa`` (offline), or a hub
      data set with a query and a document column;
    - ``data_files``: local ``csv``/``tsv``/``json``(lines)/``parquet`` files, a mapping
      split -> path(s), or one path (then validation and test are carved from it).

    Splits the source lacks are carved from ``train`` with ``split_seed`` and recorded in the
    run's ``data_splits.json``. Tokenisation is cached by ``datasets`` fingerprints. The
    validation and test metrics are recall@k over each split's own documents
    (:class:`RecallAtK`); the checkpoint follows ``val/recall@<first k>``.

    Args:
        dataset / dataset_config / revision: a packaged or hub data set.
        data_files: local files, split -> path(s), or one path.
        query_column / document_column: the columns of the two texts.
        split_names / validation_fraction / test_fraction / split_seed: as for
            :class:`~kd_lightning.data.TextClassificationDataModule`.
        tokenizer: a tokenizer name or folder; default: the model's.
        max_query_length / max_document_length: truncation lengths in tokens.
        max_train_samples / max_eval_samples: keep N pairs of the split, drawn at random with
            ``split_seed`` and kept in the split's order (an evaluation split's corpus is then the
            documents of the pairs kept).
        batch_size / eval_batch_size: pairs per batch (the in-batch negatives of a training
            query are the other ``batch_size - 1`` documents); evaluation: ``2 * batch_size``.
        recall_at: the cut-offs ``k`` of recall@k.
        shuffle_seed / num_workers: as for :class:`~kd_lightning.data.TextClassificationDataModule`.
    """

    packaged_sets = PACKAGED_RETRIEVAL_SETS
    data_kind = "retrieval data set"

    def __init__(
        self,
        dataset: str | None = None,
        dataset_config: str | None = None,
        data_files: str | dict[str, str | list[str]] | None = None,
        query_column: str = "query",
        document_column: str = "document",
        split_names: dict[str, str] | None = None,
        validation_fraction: float = 0.1,
        test_fraction: float = 0.1,
        split_seed: int = 0,
        revision: str | None = None,
        tokenizer: str | None = None,
        max_query_length: int = 32,
        max_document_length: int = 128,
        max_train_samples: int | None = None,
        max_eval_samples: int | None = None,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        recall_at: list[int] | None = None,
        shuffle_seed: int | None = None,
        num_workers: int = 0,
    ) -> None:
        for argument, value in (("max_query_length", max_query_length), ("max_document_length", max_document_length)):
            if not (isinstance(value, int) and value > 0):
                raise ValueError(
                    f"{argument} must be a positive integer, got {value!r}: set data.init_args.{argument} to 1 or more"
                )
        super().__init__(
            dataset=dataset,
            dataset_config=dataset_config,
            data_files=data_files,
            text_column=query_column,
            label_column=document_column,
            split_names=split_names,
            validation_fraction=validation_fraction,
            test_fraction=test_fraction,
            split_seed=split_seed,
            revision=revision,
            tokenizer=tokenizer,
            max_length=max(max_query_length, max_document_length),
            max_train_samples=max_train_samples,
            max_eval_samples=max_eval_samples,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            shuffle_seed=shuffle_seed,
            num_workers=num_workers,
        )
        self.query_column, self.document_column = query_column, document_column
        self.max_query_length, self.max_document_length = max_query_length, max_document_length
        self.recall_at = check_cutoffs(recall_at if recall_at is not None else (1, 5, 10))

    # ---- the task --------------------------------------------------------------------------------
    def task_metrics(self) -> MetricCollection:
        """recall@k for each ``k`` of ``recall_at`` (``val/recall@1``, ...)."""
        return retrieval_metrics(self.recall_at)

    @property
    def monitor(self) -> str:
        return f"val/recall@{self.recall_at[0]}"

    @property
    def monitor_mode(self) -> str:
        return "max"

    # ---- loading -------------------------------------------------------------------------------
    def _offline_choices(self) -> str:
        return (
            f"{' or '.join(PACKAGED_RETRIEVAL_SETS)}, or data_files with a {self.query_column!r} and a "
            f"{self.document_column!r} column."
        )

    def _check_columns(self, split: str, data: Any) -> None:
        missing = [c for c in (self.query_column, self.document_column) if c not in data.column_names]
        if missing:
            hints = "".join(did_you_mean(c, data.column_names) for c in missing)
            raise ValueError(
                f"the {split} split has no column(s) {missing}{hints}; its columns are {data.column_names}. "
                "Set query_column / document_column to the names of the query and document columns."
            )
        if len(data) == 0:
            raise ValueError(f"the {split} split is empty: check the files, split_names or max_*_samples")

    def _check_texts(self, split: str, data: Any) -> None:
        """Every row has a non-empty query and document."""
        for column in (self.query_column, self.document_column):
            values = _column(data, column).to_pylist()
            empty = [i for i, v in enumerate(values) if v is None or not str(v).strip()]
            if empty:
                raise ValueError(
                    f"the {split} split has {len(empty)} row(s) with an empty or missing {column!r}, e.g. 0-based "
                    f"row(s) {empty[:5]}: fill them in, or remove those rows"
                )

    def _with_ids(self, data: Any) -> Any:
        """``query_id`` and ``document_id`` columns: each text's rank of first appearance in the split."""
        ids = {}
        for side, column in (("query", self.query_column), ("document", self.document_column)):
            seen: dict[str, int] = {}
            ids[side] = [seen.setdefault(str(text), len(seen)) for text in _column(data, column).to_pylist()]
        fingerprint = _digest(data._fingerprint, "retrieval-ids", self.query_column, self.document_column)
        data = data.add_column("query_id", ids["query"], new_fingerprint=fingerprint + "q")
        return data.add_column("document_id", ids["document"], new_fingerprint=fingerprint + "d")

    # ---- tokenisation --------------------------------------------------------------------------
    def _tokenize_pairs(self, split: str, data: Any) -> Any:
        tokenizer, query, document = self.tokenizer, self.query_column, self.document_column
        max_query, max_document = self.max_query_length, self.max_document_length

        def encode(rows: dict[str, list[Any]], indices: list[int]) -> dict[str, Any]:
            out: dict[str, Any] = {}
            for side, column, limit in (("query", query, max_query), ("document", document, max_document)):
                encoded = tokenizer([str(t) for t in rows[column]], truncation=True, max_length=limit)
                out.update({f"{side}_{f}": encoded[f] for f in ENCODER_FIELDS if f in encoded})
            out["query_id"], out["document_id"], out["index"] = rows["query_id"], rows["document_id"], indices
            return out

        fingerprint = _digest(
            data._fingerprint, self._tokenizer_key(), "retrieval", query, document, max_query, max_document
        )
        return _map_rows(data, encode, fingerprint, f"Tokenising {split} queries and documents")

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        for split, data in self._checked_splits().items():
            data = self._subset(split, data)
            self._check_texts(split, data)
            self.datasets[split] = self._tokenize_pairs(split, self._with_ids(data))
        self.split_record["sizes_used"] = {split: len(d) for split, d in self.datasets.items()}
        self.split_record["distinct_documents"] = {
            split: len(set(_column(d, "document_id").to_pylist())) for split, d in self.datasets.items()
        }
        self._record_splits()

    def collator(self) -> RetrievalCollator:
        return RetrievalCollator(self.tokenizer)


__all__ = [
    "PACKAGED_RETRIEVAL_SETS",
    "QuestionAnswerPairs",
    "RecallAtK",
    "RetrievalCollator",
    "RetrievalDataModule",
    "retrieval_metrics",
    "side_inputs",
]

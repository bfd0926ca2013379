"""RunSummary's training throughput counts the examples of every kind of batch."""

from __future__ import annotations

import torch

from kd_lightning.callbacks.summary import batch_examples


def test_examples_of_classification_retrieval_and_causal_batches():
    classification = {"input_ids": torch.ones(8, 5, dtype=torch.long), "labels": torch.zeros(8), "index": torch.arange(8)}
    retrieval = {"query_input_ids": torch.ones(6, 4), "document_input_ids": torch.ones(6, 9), "index": torch.arange(6)}
    no_index = {"input_ids": torch.ones(3, 7), "labels": torch.zeros(3)}
    inputs_only = {"input_ids": torch.ones(5, 2)}
    assert [batch_examples(b) for b in (classification, retrieval, no_index, inputs_only)] == [8, 6, 3, 5]
    assert batch_examples({"text": ["a", "b"]}) == 0 and batch_examples([torch.ones(2)]) == 0

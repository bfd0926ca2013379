"""Recall@k of dense retrieval (dual encoders): each distinct query of a split ranks every
distinct document of the split."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric, MetricCollection
from torchmetrics.utilities import dim_zero_cat


def first_rows(ids: Tensor) -> tuple[Tensor, Tensor]:
    """``(first, inverse)``: the row of the first occurrence of each distinct id (in sorted id
    order), and each row's position among the distinct ids."""
    unique, inverse = torch.unique(ids, return_inverse=True)
    rows = torch.arange(ids.shape[0], device=ids.device)
    first = torch.full((unique.shape[0],), ids.shape[0], dtype=torch.long, device=ids.device)
    return first.scatter_reduce(0, inverse, rows, reduce="amin"), inverse


class RecallAtK(Metric):
    """Recall@k of dense retrieval: each distinct query of a split ranks every distinct document of the split.

    ``update`` takes the embeddings of ``n`` (query, relevant document) pairs and the ids that
    name the query and the document within the split (rows with the same id are the same text).
    ``compute`` scores every distinct query ``q`` against every distinct document ``d`` seen,
    ``s(q, d) = <e_q, e_d>``, and returns, for each ``k``,

        recall@k = 1/|Q| sum_{q in Q} |R(q) ∩ top_k(q)| / |R(q)|,

    with ``R(q)`` the documents paired with ``q`` and ``top_k(q)`` its ``k`` highest-scoring
    documents (the whole corpus when it holds fewer than ``k``). For a query with one relevant
    document this is whether that document ranks in the top ``k``. Embeddings are kept on the
    metric's device until ``compute`` (``pairs x width``; the score matrix is ``|Q| x |D|``) and
    gathered across processes.

    Args:
        ks: the cut-offs ``k``; logged as ``recall@<k>``.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, ks: Sequence[int] = (1, 5, 10), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.ks = check_cutoffs(ks)
        for name in ("query_embeddings", "document_embeddings", "query_ids", "document_ids"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(
        self, query_embeddings: Tensor, document_embeddings: Tensor, query_ids: Tensor, document_ids: Tensor
    ) -> None:
        n = query_embeddings.shape[0]
        if query_embeddings.dim() != 2 or document_embeddings.shape != query_embeddings.shape:
            raise ValueError(
                f"RecallAtK.update takes (pairs, width) query and document embeddings of one shape, got "
                f"{tuple(query_embeddings.shape)} and {tuple(document_embeddings.shape)}"
            )
        if query_ids.shape != (n,) or document_ids.shape != (n,):
            raise ValueError(
                f"RecallAtK.update: query_ids and document_ids must be ({n},), got {tuple(query_ids.shape)}, {tuple(document_ids.shape)}"
            )
        self.query_embeddings.append(query_embeddings.detach().float())
        self.document_embeddings.append(document_embeddings.detach().float())
        self.query_ids.append(query_ids.long())
        self.document_ids.append(document_ids.long())

    def compute(self) -> dict[str, Tensor]:
        if not self.query_ids:
            return {f"recall@{k}": torch.tensor(0.0, device=self.device) for k in self.ks}
        queries, documents = dim_zero_cat(self.query_embeddings), dim_zero_cat(self.document_embeddings)
        query_first, query_of_pair = first_rows(dim_zero_cat(self.query_ids))
        document_first, document_of_pair = first_rows(dim_zero_cat(self.document_ids))
        relevant = torch.zeros(query_first.shape[0], document_first.shape[0], dtype=torch.bool, device=queries.device)
        relevant[query_of_pair, document_of_pair] = True
        scores = queries[query_first] @ documents[document_first].T
        ranked = scores.topk(min(max(self.ks), scores.shape[1]), dim=1).indices
        hits = relevant.gather(1, ranked).float()
        per_query = relevant.sum(1).float()
        return {f"recall@{k}": (hits[:, :k].sum(1) / per_query).mean() for k in self.ks}


def check_cutoffs(ks: Sequence[int]) -> tuple[int, ...]:
    """The recall cut-offs as a tuple of distinct positive integers, in the order given."""
    values = list(ks)
    if not values or not all(isinstance(k, int) and not isinstance(k, bool) and k > 0 for k in values):
        raise ValueError(f"recall_at must list positive integers (cut-offs k of recall@k), got {ks!r}, e.g. [1, 5, 10]")
    return tuple(dict.fromkeys(values))


def retrieval_metrics(ks: Sequence[int] = (1, 5, 10)) -> MetricCollection:
    """``recall@k`` for each ``k`` (logged as ``val/recall@1``, ...)."""
    return MetricCollection({"recall": RecallAtK(ks)})

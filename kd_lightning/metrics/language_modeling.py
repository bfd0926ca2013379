"""Metrics of causal language models on response tokens: negative log-likelihood and perplexity."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric, MetricCollection

from kd_lightning.losses.functional import IGNORE_INDEX, next_token_targets, token_cross_entropy


class ResponseTokenNLL(Metric):
    """Mean next-token negative log-likelihood over every response token of the data, and its perplexity.

    ``nll = -1/N sum_{response tokens j} log p(y_j | y_<j)`` over all ``N`` response tokens seen
    (a token-weighted mean, not a mean of batch means), ``ppl = exp(nll)``. ``update`` takes the
    ``(batch, seq, vocab)`` logits and the ``(batch, seq)`` labels (``-100`` on prompt and padding
    tokens, aligned with the inputs: the shift to next-token targets happens here).

    Args:
        chunk_size: token rows per chunk of the log-softmax (bounds the ``tokens x vocab`` memory).
    """

    full_state_update = False
    higher_is_better = False

    def __init__(self, chunk_size: int | None = 1024, **kwargs) -> None:
        super().__init__(**kwargs)
        self.chunk_size = chunk_size
        self.add_state("nll_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("tokens", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, logits: Tensor, labels: Tensor) -> None:
        targets = next_token_targets(labels)
        count = (targets != IGNORE_INDEX).sum()
        mean = token_cross_entropy(logits.detach(), targets, chunk_size=self.chunk_size)
        self.nll_sum += mean.double() * count
        self.tokens += count

    def compute(self) -> dict[str, Tensor]:
        nll = (self.nll_sum / self.tokens.clamp_min(1)).float()
        return {"nll": nll, "ppl": nll.exp()}


def language_model_metrics(chunk_size: int | None = 1024) -> MetricCollection:
    """``nll`` and ``ppl`` of the response tokens (logged as ``val/nll``, ``val/ppl``, ...)."""
    return MetricCollection({"response": ResponseTokenNLL(chunk_size=chunk_size)})

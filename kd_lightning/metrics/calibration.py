"""Reliability bins: the confidence-vs-accuracy curve behind expected calibration error."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torchmetrics import Metric


@dataclass
class ReliabilityCurve:
    """Per-bin statistics of equal-width confidence bins over ``[0, 1]``.

    Attributes:
        edges: ``(bins + 1,)`` bin edges.
        confidence: ``(bins,)`` mean confidence of the predictions in each bin (0 where empty).
        accuracy: ``(bins,)`` share of correct predictions in each bin (0 where empty).
        count: ``(bins,)`` predictions per bin.
        ece: expected calibration error, ``sum_b n_b / n * |accuracy_b - confidence_b|``.
    """

    edges: Tensor
    confidence: Tensor
    accuracy: Tensor
    count: Tensor
    ece: Tensor


class ReliabilityBins(Metric):
    """Confidence (the top class probability) against accuracy, in equal-width bins.

    The binning is torchmetrics' ``MulticlassCalibrationError`` (``norm="l1"``): a prediction
    of confidence ``c`` falls in the bin ``[e_k, e_{k+1})`` and ``c = 1`` in a bin of its own,
    so :attr:`ReliabilityCurve.ece` equals the logged ``ece`` metric with the same ``n_bins``.
    The curve merges that last bin into the top one for display. Three sums per bin are kept
    (summed across processes), so memory does not grow with the data.

    Args:
        n_bins: number of bins (15, as the task metrics' ``ece``).
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, n_bins: int = 15, **kwargs) -> None:
        super().__init__(**kwargs)
        if n_bins < 1:
            raise ValueError(f"n_bins must be at least 1, got {n_bins}")
        self.n_bins = n_bins
        f64 = torch.float64
        self.add_state("count", torch.zeros(n_bins + 1, dtype=f64), dist_reduce_fx="sum")
        self.add_state("confidence_sum", torch.zeros(n_bins + 1, dtype=f64), dist_reduce_fx="sum")
        self.add_state("correct_sum", torch.zeros(n_bins + 1, dtype=f64), dist_reduce_fx="sum")

    def update(self, probabilities: Tensor, target: Tensor) -> None:
        """Add ``(n, classes)`` probabilities and their ``(n,)`` integer labels."""
        confidence, predicted = probabilities.detach().to(torch.float64).max(dim=-1)
        edges = torch.linspace(0, 1, self.n_bins + 1, dtype=torch.float64, device=confidence.device)
        index = torch.bucketize(confidence, edges, right=True) - 1
        self.count.scatter_add_(0, index, torch.ones_like(confidence))
        self.confidence_sum.scatter_add_(0, index, confidence)
        self.correct_sum.scatter_add_(0, index, (predicted == target).to(torch.float64))

    def compute(self) -> ReliabilityCurve:
        def per_bin(total: Tensor, count: Tensor) -> Tensor:
            return torch.where(count > 0, total / count.clamp_min(1.0), torch.zeros_like(total))

        confidence, accuracy = per_bin(self.confidence_sum, self.count), per_bin(self.correct_sum, self.count)
        ece = (self.count / self.count.sum().clamp_min(1.0) * (accuracy - confidence).abs()).sum()
        count, confidence_sum, correct_sum = (
            torch.cat([t[:-2], t[-2:].sum(0, keepdim=True)]) for t in (self.count, self.confidence_sum, self.correct_sum)
        )
        return ReliabilityCurve(
            edges=torch.linspace(0, 1, self.n_bins + 1, dtype=torch.float64, device=count.device),
            confidence=per_bin(confidence_sum, count),
            accuracy=per_bin(correct_sum, count),
            count=count,
            ece=ece,
        )

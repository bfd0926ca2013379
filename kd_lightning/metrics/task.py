"""Task metrics of classifiers, from torchmetrics (synced across processes)."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassCalibrationError, MulticlassF1Score


def classification_metrics(num_labels: int) -> MetricCollection:
    """Accuracy, macro F1 and expected calibration error (15 equal-width bins, L1)."""
    return MetricCollection(
        {
            "acc": MulticlassAccuracy(num_classes=num_labels, average="micro"),
            "f1": MulticlassF1Score(num_classes=num_labels, average="macro"),
            "ece": MulticlassCalibrationError(num_classes=num_labels, n_bins=15, norm="l1"),
        }
    )


def class_probabilities(logits: Tensor) -> Tensor:
    """Softmax in float32: what the metrics take as predictions."""
    return torch.softmax(logits.float(), dim=-1)

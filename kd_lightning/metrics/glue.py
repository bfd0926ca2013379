"""The official GLUE metrics (Wang et al., 2019, "GLUE: A Multi-Task Benchmark and Analysis
Platform for Natural Language Understanding") as torchmetrics collections.

Every classification collection takes class probabilities ``(n, C)`` and integer targets, like
:func:`~kd_lightning.metrics.task.classification_metrics`; the regression collection takes
scores ``(n,)`` and float targets. The official scorer of each task:

======  ==========================================================
CoLA    Matthews correlation (``mcc``; 0 when undefined, as sklearn)
MRPC    F1 of the positive class (``f1``) and accuracy (``acc``)
QQP     F1 of the positive class (``f1``) and accuracy (``acc``)
STS-B   Pearson (``pearson``) and Spearman (``spearman``) correlation
others  accuracy (``acc``)
======  ==========================================================

Classification collections also carry expected calibration error (``ece``, 15 bins), which
every run logs (METHODS.md); regression ones the mean squared error (``mse``).
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor
from torchmetrics import MeanSquaredError, MetricCollection, PearsonCorrCoef, SpearmanCorrCoef
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassCalibrationError,
    MulticlassF1Score,
    MulticlassMatthewsCorrCoef,
)


class MatthewsCorrCoef(MulticlassMatthewsCorrCoef):
    """Matthews correlation as GLUE's scorer computes it (``sklearn.metrics.matthews_corrcoef``).

    ``MCC = (c s - sum_k t_k p_k) / sqrt((s^2 - sum_k p_k^2)(s^2 - sum_k t_k^2))`` over the
    confusion matrix (``c`` correct, ``s`` rows, ``t_k`` / ``p_k`` true / predicted counts of
    class ``k``), and 0 when the denominator is 0. torchmetrics instead returns a non-zero limit
    value (Chicco et al., 2020) when every prediction is one class — the usual state of an
    early CoLA model — which would differ from the official number and mislead checkpointing.
    """

    def compute(self) -> Tensor:
        confmat = self.confmat.double()
        true, predicted = confmat.sum(dim=1), confmat.sum(dim=0)
        correct, total = torch.trace(confmat), confmat.sum()
        denominator = (total**2 - (predicted**2).sum()) * (total**2 - (true**2).sum())
        if denominator == 0:
            return torch.zeros((), dtype=torch.float32, device=confmat.device)
        return ((correct * total - (true * predicted).sum()) / denominator.sqrt()).float()


class PositiveClassF1(MulticlassF1Score):
    """F1 of one class (GLUE's MRPC/QQP score: ``sklearn.metrics.f1_score(y, y_hat)``, class 1).

    Takes the same ``(n, C)`` probabilities as the other classification metrics.

    Args:
        num_classes: number of classes (2 for MRPC and QQP).
        positive: the index of the class whose F1 is reported.
    """

    def __init__(self, num_classes: int = 2, positive: int = 1) -> None:
        super().__init__(num_classes=num_classes, average="none")
        self.positive = positive

    def compute(self) -> Tensor:
        return super().compute()[self.positive]


def regression_metrics() -> MetricCollection:
    """Pearson and Spearman correlation and mean squared error of scores ``(n,)``.

    Spearman keeps every score of the epoch (ranks need them all): fine for evaluation sets of
    GLUE's size, so torchmetrics' warning about it is silenced here.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all targets and predictions.*")
        spearman = SpearmanCorrCoef()
    return MetricCollection({"pearson": PearsonCorrCoef(), "spearman": spearman, "mse": MeanSquaredError()})


def glue_metrics(task: str, num_labels: int) -> MetricCollection:
    """The official metrics of a GLUE task (``cola``, ``sst2``, ``mrpc``, ``stsb``, ...)."""
    if task == "stsb":
        return regression_metrics()
    metrics = {"acc": MulticlassAccuracy(num_classes=num_labels, average="micro")}
    if task == "cola":
        metrics = {"mcc": MatthewsCorrCoef(num_classes=num_labels), **metrics}
    if task in ("mrpc", "qqp"):
        metrics["f1"] = PositiveClassF1(num_classes=num_labels)
    metrics["ece"] = MulticlassCalibrationError(num_classes=num_labels, n_bins=15, norm="l1")
    return MetricCollection(metrics)

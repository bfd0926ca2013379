"""SinKD: the Sinkhorn distance between the batch's teacher and student output distributions."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from torch import Tensor

from kd_lightning.losses import functional
from kd_lightning.losses.base import DistillLoss, positive, row_mask
from kd_lightning.outputs import ModelOutputs


class SinkhornDistance(DistillLoss):
    """SinKD (Cui et al., 2024, "Sinkhorn Distance Minimization for Knowledge Distillation").

    Batch-wise optimal transport between the rows of ``p_s`` and ``p_t`` (``softmax(z / T)``):
    cost ``W_ij = ||p_s^i - p_t^j||_1``, ``K = exp(-W / eps)``, ``iterations`` alternating
    row/column normalisations (log domain) give ``P``; the loss is ``sum(P * W)``. The official
    recipe is ``a KD + (1 - a) CE + b * 0.001 * sum(P * W)`` with ``b = 0.8``: give this loss
    ``weight: 0.0008`` (its ``reduction="sum"`` keeps the official scale, plan mass ``n``;
    ``"mean"`` divides by the batch size). Cost ``O(n^2 C)``: for pooled rows.

    Args:
        temperature: softening temperature ``T`` (2 in the paper).
        epsilon: entropic regularisation ``eps`` (0.1).
        iterations: rounds of row + column normalisation (20).
        reduction: ``sum`` (official) or ``mean`` (divided by the number of rows).
        mask_key, weight, name: see :class:`~kd_lightning.losses.logits.LogitDivergence`.
    """

    def __init__(
        self,
        temperature: float = 2.0,
        epsilon: float = 0.1,
        iterations: int = 20,
        reduction: Literal["sum", "mean"] = "sum",
        mask_key: str | None = None,
        weight: float = 1.0,
        name: str | None = None,
    ) -> None:
        super().__init__(weight=weight, name=name)
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
        self.temperature = positive(temperature, "temperature", type(self).__name__)
        self.epsilon = positive(epsilon, "epsilon", type(self).__name__)
        self.iterations = int(iterations)
        self.reduction = reduction
        self.mask_key = mask_key

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | None, batch: Mapping[str, Any]) -> Tensor:
        return functional.sinkhorn_distance(
            student.logits,
            teacher.logits,
            self.temperature,
            self.epsilon,
            self.iterations,
            mask=row_mask(student, batch, self.mask_key),
            reduction=self.reduction,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, temperature={self.temperature}, epsilon={self.epsilon}, iterations={self.iterations}"

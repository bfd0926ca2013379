"""DIST: distillation by correlation, between and within classes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from kd_lightning.losses import functional
from kd_lightning.losses.base import DistillLoss, positive, row_mask
from kd_lightning.outputs import ModelOutputs


class DIST(DistillLoss):
    """DIST (Huang et al., 2022, "Knowledge Distillation from A Stronger Teacher").

    ``T^2 [beta (1 - mean_i rho(p_s^i, p_t^i)) + gamma (1 - mean_c rho(p_s^{:,c}, p_t^{:,c}))]``
    with ``rho`` the Pearson correlation, over each row (inter-class relation) and over each
    class column of the batch (intra-class relation). Only the ranking of the teacher's
    probabilities is matched, not their values.

    Args:
        beta: weight of the inter-class term (1).
        gamma: weight of the intra-class term (1).
        temperature: ``T`` (1).
        mask_key, weight, name: see :class:`~kd_lightning.losses.logits.LogitDivergence`.
    """

    def __init__(
        self,
        beta: float = 1.0,
        gamma: float = 1.0,
        temperature: float = 1.0,
        mask_key: str | None = None,
        weight: float = 1.0,
        name: str | None = None,
    ) -> None:
        super().__init__(weight=weight, name=name)
        self.beta = float(beta)
        self.gamma = float(gamma)
        self.temperature = positive(temperature, "temperature", type(self).__name__)
        self.mask_key = mask_key

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | None, batch: Mapping[str, Any]) -> Tensor:
        mask = row_mask(student, batch, self.mask_key)
        return functional.dist_loss(student.logits, teacher.logits, self.beta, self.gamma, self.temperature, mask)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, beta={self.beta}, gamma={self.gamma}, temperature={self.temperature}"

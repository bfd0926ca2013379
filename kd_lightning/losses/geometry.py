"""Geometry-aware feature losses: the batch's representation compared up to rotations.

All three take the student and teacher rows of one tap pair, centre the columns, scale to unit
Frobenius norm and need no projection (widths may differ). Following the geometry-aware KD
paper (Bhattarai et al., seed 000), add one of them with weight ``alpha`` to a KD loss.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from kd_lightning.losses import functional
from kd_lightning.losses.base import FeatureLoss
from kd_lightning.outputs import ModelOutputs


class Procrustes(FeatureLoss):
    """Orthogonal Procrustes distance (Williams et al., 2021; Bhattarai et al., seed 000).

    ``D_P^2 = min_{Q^T Q = I} ||T - S Q||_F^2 = 2 - 2 ||T^T S||_*`` on normalised rows. Zero only
    when the student is the teacher up to a rotation and a scale, unlike projected MSE, which
    also vanishes for any invertible linear map (notebooks/03_geometry.ipynb).

    Args:
        student, teacher: the tap names.
        squared: ``D_P^2`` (default) or ``D_P``.
        angular: the angle ``arccos(||T^T S||_*)`` instead.
        weight, name: see :class:`~kd_lightning.losses.base.DistillLoss`.
    """

    def __init__(
        self,
        student: str,
        teacher: str,
        squared: bool = True,
        angular: bool = False,
        weight: float = 1.0,
        name: str | None = None,
    ) -> None:
        super().__init__(student, teacher, weight=weight, name=name)
        self.squared = squared
        self.angular = angular

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | None, batch: Mapping[str, Any]) -> Tensor:
        return functional.procrustes_distance(*self.feature_pair(student, teacher), self.squared, self.angular)


class GramDistance(FeatureLoss):
    """Feature-Gram Frobenius distance (Bhattarai et al., seed 000): ``||T T^T - S S^T||_F``.

    On normalised rows; zero exactly when the Procrustes distance is.

    Args:
        student, teacher: the tap names.
        squared: return ``||T T^T - S S^T||_F^2`` instead.
        weight, name: see :class:`~kd_lightning.losses.base.DistillLoss`.
    """

    def __init__(
        self, student: str, teacher: str, squared: bool = False, weight: float = 1.0, name: str | None = None
    ) -> None:
        super().__init__(student, teacher, weight=weight, name=name)
        self.squared = squared

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | None, batch: Mapping[str, Any]) -> Tensor:
        return functional.gram_distance(*self.feature_pair(student, teacher), self.squared)


class CKA(FeatureLoss):
    """Linear CKA as a loss (Kornblith et al., 2019; as a KD loss e.g. Saha et al., 2022): ``1 - CKA``.

    ``CKA = ||S^T T||_F^2 / (||S^T S||_F ||T^T T||_F)`` on centred rows, invariant to
    orthogonal maps and isotropic scaling. It weighs directions by their squared variance, so
    it can sit near 1 while the Procrustes distance stays large when a few directions dominate
    (Harvey et al., 2023): seed 000's reason to prefer Procrustes or Gram.
    """

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | None, batch: Mapping[str, Any]) -> Tensor:
        return 1 - functional.linear_cka(*self.feature_pair(student, teacher))

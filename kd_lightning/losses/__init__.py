"""Distillation losses: ``functional`` holds the math, the classes wire it to taps and YAML."""

from kd_lightning.losses.base import DistillLoss, FeatureLoss
from kd_lightning.losses.comparative import ComparativeFeatureKD, ComparativeKD
from kd_lightning.losses.dist import DIST
from kd_lightning.losses.dkd import DKD
from kd_lightning.losses.features import CosineDistance, ProjectedMSE
from kd_lightning.losses.geometry import CKA, GramDistance, Procrustes
from kd_lightning.losses.logits import (
    BalancedDivergence,
    CrossEntropy,
    JSDivergence,
    KLDivergence,
    LogitDivergence,
    ReverseKLDivergence,
    SkewKLDivergence,
    SkewReverseKLDivergence,
    TotalVariationDistance,
)
from kd_lightning.losses.nd import NDLoss
from kd_lightning.losses.next_token import NextTokenCrossEntropy
from kd_lightning.losses.regression import LabelMSE, ScoreMSE
from kd_lightning.losses.sinkhorn import SinkhornDistance
from kd_lightning.losses.wdm import WassersteinDependency

__all__ = [
    "CKA",
    "DIST",
    "DKD",
    "BalancedDivergence",
    "ComparativeFeatureKD",
    "ComparativeKD",
    "CosineDistance",
    "CrossEntropy",
    "DistillLoss",
    "FeatureLoss",
    "GramDistance",
    "JSDivergence",
    "KLDivergence",
    "LabelMSE",
    "LogitDivergence",
    "NDLoss",
    "NextTokenCrossEntropy",
    "Procrustes",
    "ProjectedMSE",
    "ReverseKLDivergence",
    "ScoreMSE",
    "SinkhornDistance",
    "SkewKLDivergence",
    "SkewReverseKLDivergence",
    "TotalVariationDistance",
    "WassersteinDependency",
]

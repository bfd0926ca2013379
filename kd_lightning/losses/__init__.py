"""Distillation losses: ``functional`` holds the math, the classes wire it to taps and YAML."""

from kd_lightning.losses.base import DistillLoss, FeatureLoss
from kd_lightning.losses.features import ProjectedMSE
from kd_lightning.losses.logits import CrossEntropy, KLDivergence

__all__ = ["CrossEntropy", "DistillLoss", "FeatureLoss", "KLDivergence", "ProjectedMSE"]

"""Methods that are more than a loss: DistillModule subclasses and their teacher statistics."""

from kd_lightning.methods.adkd import ADKDModule, AttributionLoss
from kd_lightning.methods.dpk import DPKFeatureLoss, DPKModule
from kd_lightning.methods.embed_distill import (
    EmbeddingMatching,
    EmbedDistillModule,
    InBatchContrastive,
    ScoreDistillation,
)
from kd_lightning.methods.lelp import LELPLoss, LELPModule
from kd_lightning.methods.online_bdkd import OnlineBDKDModule
from kd_lightning.methods.srd import SRDLoss, SRDModule

__all__ = [
    "ADKDModule",
    "AttributionLoss",
    "DPKFeatureLoss",
    "DPKModule",
    "EmbedDistillModule",
    "EmbeddingMatching",
    "InBatchContrastive",
    "LELPLoss",
    "LELPModule",
    "OnlineBDKDModule",
    "SRDLoss",
    "SRDModule",
    "ScoreDistillation",
]

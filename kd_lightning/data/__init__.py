"""LightningDataModules per task family, on HF ``datasets``."""

from kd_lightning.data.glue import GLUE_TASKS, GlueDataModule
from kd_lightning.data.hub import HubDataModule, HubSchema
from kd_lightning.data.packaged import PACKAGED_DATASETS, DataDownloadError, materialize_packaged
from kd_lightning.data.sampling import LengthGroupedBatchSampler
from kd_lightning.data.sentiment import SENTIMENT_SETS, SentimentDataModule
from kd_lightning.data.text_classification import TextClassificationDataModule

__all__ = [
    "GLUE_TASKS",
    "PACKAGED_DATASETS",
    "SENTIMENT_SETS",
    "DataDownloadError",
    "GlueDataModule",
    "HubDataModule",
    "HubSchema",
    "LengthGroupedBatchSampler",
    "SentimentDataModule",
    "TextClassificationDataModule",
    "materialize_packaged",
]

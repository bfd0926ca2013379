"""LightningDataModules per task family, on HF ``datasets``."""

from kd_lightning.data.glue import GLUE_TASKS, GlueDataModule
from kd_lightning.data.hub import HubDataModule, HubSchema
from kd_lightning.data.instruction import InstructionDataModule
from kd_lightning.data.instruction_sources import INSTRUCTION_SCHEMAS, PACKAGED_INSTRUCTION_SETS
from kd_lightning.data.packaged import PACKAGED_DATASETS, DataDownloadError, materialize_packaged
from kd_lightning.data.retrieval import PACKAGED_RETRIEVAL_SETS, RecallAtK, RetrievalDataModule
from kd_lightning.data.sampling import (
    EpochRandomSampler,
    LengthGroupedBatchSampler,
    ResumableBatchSampler,
    ResumableDataLoader,
)
from kd_lightning.data.sentiment import SENTIMENT_SETS, SentimentDataModule
from kd_lightning.data.text_classification import TextClassificationDataModule

__all__ = [
    "GLUE_TASKS",
    "INSTRUCTION_SCHEMAS",
    "PACKAGED_DATASETS",
    "PACKAGED_INSTRUCTION_SETS",
    "PACKAGED_RETRIEVAL_SETS",
    "SENTIMENT_SETS",
    "DataDownloadError",
    "EpochRandomSampler",
    "GlueDataModule",
    "HubDataModule",
    "HubSchema",
    "InstructionDataModule",
    "LengthGroupedBatchSampler",
    "RecallAtK",
    "ResumableBatchSampler",
    "ResumableDataLoader",
    "RetrievalDataModule",
    "SentimentDataModule",
    "TextClassificationDataModule",
    "materialize_packaged",
]

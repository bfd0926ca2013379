"""LightningDataModules per task family, on HF ``datasets``."""

from kd_lightning.data.packaged import PACKAGED_DATASETS, materialize_packaged
from kd_lightning.data.text_classification import TextClassificationDataModule

__all__ = ["PACKAGED_DATASETS", "TextClassificationDataModule", "materialize_packaged"]

"""Lightning Callbacks: export, loss schedules, alignment logging."""

from kd_lightning.callbacks.alignment import AlignmentLogger
from kd_lightning.callbacks.class_means import TeacherClassMeans
from kd_lightning.callbacks.export import ExportHF
from kd_lightning.callbacks.schedules import LossWeightWarmup, TemperatureAnneal
from kd_lightning.callbacks.summary import RunSummary

__all__ = ["AlignmentLogger", "ExportHF", "LossWeightWarmup", "RunSummary", "TeacherClassMeans", "TemperatureAnneal"]

"""Lightning Callbacks: export, loss schedules, alignment logging, TensorBoard diagnostics and hyper-parameters."""

from kd_lightning.callbacks.alignment import AlignmentLogger
from kd_lightning.callbacks.class_means import TeacherClassMeans
from kd_lightning.callbacks.diagnostics import ValidationDiagnostics
from kd_lightning.callbacks.dpk_schedule import DPKShareSchedule
from kd_lightning.callbacks.export import ExportHF
from kd_lightning.callbacks.generalisation import GeneralisationDiagnostic
from kd_lightning.callbacks.generation import GenerationEvaluator
from kd_lightning.callbacks.hparams import HParamsSummary
from kd_lightning.callbacks.schedules import LossWeightWarmup, TemperatureAnneal
from kd_lightning.callbacks.summary import RunSummary

__all__ = [
    "AlignmentLogger",
    "DPKShareSchedule",
    "ExportHF",
    "GeneralisationDiagnostic",
    "GenerationEvaluator",
    "HParamsSummary",
    "LossWeightWarmup",
    "RunSummary",
    "TeacherClassMeans",
    "TemperatureAnneal",
    "ValidationDiagnostics",
]

"""kd_lightning: knowledge distillation of language models on PyTorch Lightning."""

from kd_lightning.finetune import FineTuneModule
from kd_lightning.models import StudentSpec, TeacherSpec
from kd_lightning.module import DistillModule
from kd_lightning.outputs import ModelOutputs, StudentOutputs, TeacherOutputs
from kd_lightning.taps import FeatureTaps, TapSpec
from kd_lightning.training import OptimConfig

__version__ = "0.1.0"

__all__ = [
    "DistillModule",
    "FeatureTaps",
    "FineTuneModule",
    "ModelOutputs",
    "OptimConfig",
    "StudentOutputs",
    "StudentSpec",
    "TapSpec",
    "TeacherOutputs",
    "TeacherSpec",
]

"""kd_lightning: knowledge distillation of language models on PyTorch Lightning."""

from kd_lightning.finetune import FineTuneModule
from kd_lightning.models import StudentSpec, TeacherSpec
from kd_lightning.module import DistillModule
from kd_lightning.outputs import ModelOutputs, StudentOutputs, TeacherOutputs
from kd_lightning.taps import FeatureTaps, TapSpec
from kd_lightning.training import OptimConfig

__version__ = "0.1.0"


def _allow_config_classes_in_checkpoints() -> None:
    """Checkpoints hold the modules' hyper-parameters, which include these config dataclasses;
    ``torch.load(weights_only=True)`` (the default since torch 2.6) must be allowed to rebuild them."""
    import torch

    from kd_lightning.cuda_graphs import CudaGraphConfig
    from kd_lightning.teacher_cache import TeacherCacheConfig

    torch.serialization.add_safe_globals([TeacherSpec, StudentSpec, TapSpec, OptimConfig, TeacherCacheConfig, CudaGraphConfig])


_allow_config_classes_in_checkpoints()

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

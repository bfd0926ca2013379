"""Teachers and students: loading, building, and packaged offline models."""

from kd_lightning.models.building import (
    StudentSpec,
    TeacherSpec,
    build_student,
    check_shared_vocabulary,
    count_parameters,
    find_layer_stack,
    freeze,
    load_classifier,
    load_tokenizer,
    max_input_length,
    parameter_fingerprint,
    student_from_teacher_layers,
)
from kd_lightning.models.packaged import PACKAGED_MODELS, MissingPackageError, resolve_model_path

__all__ = [
    "PACKAGED_MODELS",
    "MissingPackageError",
    "StudentSpec",
    "TeacherSpec",
    "build_student",
    "check_shared_vocabulary",
    "count_parameters",
    "find_layer_stack",
    "freeze",
    "load_classifier",
    "load_tokenizer",
    "max_input_length",
    "parameter_fingerprint",
    "resolve_model_path",
    "student_from_teacher_layers",
]

"""Causal-LM teachers and students: loading, and students built from the teacher."""

from __future__ import annotations

import os

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from kd_lightning.models.building import StudentSpec, build_headless_student, load_tokenizer
from kd_lightning.models.packaged import resolve_model_path


def load_causal_lm(name_or_path: str) -> PreTrainedModel:
    """A causal LM in float32 from a hub name, a local folder or a packaged key (``SmolLM2-135M-Instruct``)."""
    return AutoModelForCausalLM.from_pretrained(resolve_model_path(name_or_path), dtype=torch.float32)


def build_causal_student(spec: StudentSpec, teacher: PreTrainedModel) -> PreTrainedModel:
    """The student LM described by ``spec``: chosen teacher layers (weights copied, tied embeddings
    kept), a checkpoint, or the teacher's config (or ``name_or_path``'s) with ``config_overrides``
    (random initialisation)."""
    return build_headless_student(spec, teacher, load_causal_lm, AutoModelForCausalLM)


def student_tokenizer(spec: StudentSpec, teacher_tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """The tokenizer the student was trained with: its checkpoint's own when it has one, else the
    teacher's (students built from the teacher share it)."""
    if spec.name_or_path is None:
        return teacher_tokenizer
    path = resolve_model_path(spec.name_or_path)
    if os.path.isdir(path) and not any(
        os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
    ):
        return teacher_tokenizer  # a local checkpoint saved without its tokenizer
    return load_tokenizer(spec.name_or_path)

"""Teacher statistics over the training set, computed once before training (ND class means,
LELP subspaces), from one pass of the frozen teacher."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from kd_lightning.teacher_pass import model_pass, training_split


def teacher_embeddings(module: Any, datamodule: Any, tap: str, batch_size: int = 64) -> tuple[Tensor, Tensor, Tensor]:
    """The teacher tap ``tap`` (one row per example), the labels and the teacher logits over the
    training split of ``datamodule``, in split order, as float32 CPU tensors."""
    dataset, collate = training_split(datamodule)
    spec = module.tap_specs[tap]
    if spec.module != "teacher" or spec.reduce == "tokens":
        raise ValueError(f"tap {tap!r} must be a teacher tap with one row per example (cls, mean, or none on pooled outputs)")
    rows, labels, logits = [], [], []
    for step in model_pass(module.teacher, {tap: spec}, "teacher", dataset, collate, batch_size, f"Teacher statistics ({tap})"):
        features = step.features[tap]
        if features.dim() != 2:
            raise ValueError(f"tap {tap!r} gives shape {tuple(features.shape)}; statistics need (examples, width) rows")
        rows.append(features.float().cpu())
        labels.append(step.batch["labels"].cpu())
        logits.append(step.logits.float().cpu())
    return torch.cat(rows), torch.cat(labels), torch.cat(logits)

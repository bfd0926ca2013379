"""``FineTuneModule``: train a classifier on its labels alone (task-tuned teachers, baselines)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from kd_lightning.models import StudentSpec, build_student, load_classifier, load_tokenizer
from kd_lightning.training import OptimConfig, StudentModule, model_inputs


class FineTuneModule(StudentModule):
    """Fine-tuning of one classifier on its labels, with no teacher: cross-entropy, or MSE
    when ``num_labels = 1`` (regression, e.g. STS-B).

    Used to make the task-tuned teacher that a distillation config then names (export it with
    :class:`~kd_lightning.callbacks.ExportHF`), and for the no-KD student baseline.

    Args:
        model: a hub name, local folder or packaged key (``all-MiniLM-L6-v2``).
        num_labels: number of classes; 1 for a regression head.
        student: instead of ``model`` as it is, build from it with a config override or chosen
            layers (``StudentSpec`` with ``from_teacher_layers``/``config_overrides``).
        optim: optimiser and learning-rate schedule.
    """

    def __init__(
        self,
        model: str,
        num_labels: int,
        student: StudentSpec | None = None,
        optim: OptimConfig | None = None,
    ) -> None:
        super().__init__(optim)
        self.save_hyperparameters()
        self.num_labels = num_labels
        self.tokenizer = load_tokenizer(model)
        base = load_classifier(model, num_labels)
        self.student = base if student is None else build_student(student, base, num_labels)
        self._init_metrics()

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor:
        logits = self.student(**model_inputs(batch)).logits
        loss = self.supervised_loss(logits, batch["labels"])
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["labels"].shape[0])
        return loss

"""Online BD-KD: teacher and student train together, the student on balanced divergences.

Amara et al. (2023), "BD-KD: Balancing the Divergences for Online Knowledge Distillation".

Each step:

- the student minimises its configured losses (by default ``BalancedDivergence`` — forward or
  reverse KL per sample by the entropy gap — plus cross-entropy) against the teacher's
  *detached* outputs;
- the teacher minimises ``CE(z_t, y) + lambda * T^2 KL(p_t || p_s)`` with the student's
  probabilities detached: the reverse KL seen from the learner (the teacher's distribution
  first), pulling the teacher towards the student so it stays a reachable target.

The teacher is a registered submodule here (DDP syncs its gradients, checkpoints hold it) and
trains with its own parameter groups (``teacher_lr``). Validation logs both sides' task metrics
and calibration (``val/*`` and ``val/teacher/*``) every time.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Literal

import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.losses import functional
from kd_lightning.losses.base import DistillLoss
from kd_lightning.losses.logits import BalancedDivergence, CrossEntropy
from kd_lightning.models import StudentSpec, TeacherSpec
from kd_lightning.module import DistillModule
from kd_lightning.outputs import ModelOutputs
from kd_lightning.taps import TapSpec
from kd_lightning.training import OptimConfig, decay_groups


def detached(outputs: ModelOutputs) -> ModelOutputs:
    return ModelOutputs(
        logits=outputs.logits.detach(),
        features={k: v.detach() for k, v in outputs.features.items()},
        attention_mask=outputs.attention_mask,
    )


class OnlineBDKDModule(DistillModule):
    """Online distillation with balanced divergences (see the module docstring).

    Args:
        teacher, student, taps, optim: as for :class:`~kd_lightning.DistillModule`.
        losses: the student's losses; default ``[CrossEntropy(0.5), BalancedDivergence(0.5, T=2, mode=hard)]``.
        teacher_lr: the teacher's learning rate (default: ``optim.lr``).
        teacher_kl_weight: ``lambda``, weight of the teacher's reverse KL towards the student.
        teacher_temperature: ``T`` of that KL.
        nonfinite: as for :class:`~kd_lightning.DistillModule`; the teacher's objective is
            checked as the term ``teacher``.
    """

    def __init__(
        self,
        teacher: TeacherSpec,
        student: StudentSpec,
        losses: list[DistillLoss] | None = None,
        taps: dict[str, TapSpec] | None = None,
        optim: OptimConfig | None = None,
        teacher_lr: float | None = None,
        teacher_kl_weight: float = 1.0,
        teacher_temperature: float = 2.0,
        nonfinite: Literal["raise", "skip"] = "raise",
    ) -> None:
        losses = losses or [CrossEntropy(weight=0.5), BalancedDivergence(weight=0.5, temperature=2.0)]
        super().__init__(teacher, student, losses, taps=taps, optim=optim, nonfinite=nonfinite)
        self.save_hyperparameters(ignore=["losses"])
        self.online_teacher = self._teacher
        self.online_teacher.requires_grad_(True)
        self.online_teacher.train()  # loaded models come in eval mode; this teacher trains, with dropout
        self.teacher_lr = teacher_lr
        self.teacher_kl_weight = teacher_kl_weight
        self.teacher_temperature = teacher_temperature

    def teacher_is_trainable(self) -> bool:
        return True

    def parameter_groups(self) -> list[dict[str, Any]]:
        lr = self.teacher_lr if self.teacher_lr is not None else self.optim.lr
        return super().parameter_groups() + decay_groups(iter([self.online_teacher]), self.optim.weight_decay, lr=lr)

    def trainable_modules(self) -> Iterator[nn.Module]:
        yield self.student
        yield self.losses

    def teacher_loss(self, teacher: ModelOutputs, student: ModelOutputs, labels: Tensor) -> Tensor:
        """``CE(z_t, y) + lambda * T^2 KL(p_t || p_s)``, student detached."""
        ce = F.cross_entropy(teacher.logits.float(), labels)
        # reverse KL with the teacher as the learner: KL(p_t || p_s), i.e. learner distribution first
        reverse = functional.reverse_kl_divergence(teacher.logits, student.logits.detach(), self.teacher_temperature)
        return ce + self.teacher_kl_weight * reverse

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor | None:
        teacher = self.teacher_outputs(batch)
        student = self.student_outputs(batch)
        terms = self.loss_terms(student, detached(teacher), batch)
        student_total = sum(loss.weight * terms[loss.name] for loss in self.losses)
        teacher_total = self.teacher_loss(teacher, student, batch["labels"])
        if self.logger_step():
            self.log("train/loss/student", student_total.detach(), batch_size=student.logits.shape[0])
        return self.checked_total({**terms, "teacher": teacher_total}, student_total + teacher_total, batch, student.logits.shape[0])

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> ModelOutputs:
        student = super().validation_step(batch, batch_idx)
        self.update_teacher_metrics(batch, self.teacher_val_metrics)
        return student

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        self.log_dict(self.teacher_val_metrics.compute())
        self.teacher_val_metrics.reset()

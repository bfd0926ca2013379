"""LELP: Learning Embedding Linear Projections for few-class distillation.

Loo, Iliopoulos, Hu, Vee (2024), "Linear Projections of Teacher Embeddings for Few-Class
Distillation", arXiv:2409.20449.

Before training, one pass of the teacher over the training set collects its final embeddings
``h`` (the input of its classification head, ``W`` of shape ``C x d``). Then:

1. project onto the null space of ``W``: ``h_0 = h P``, ``P = I - W^T (W W^T)^+ W`` — the
   part of the embedding the teacher's classifier ignores;
2. per class ``c`` (ground-truth training labels), PCA of the ``h_0`` rows of that class: the
   top ``S`` directions ``V_c`` (``d x S``) around the class mean ``mu_c``;
3. a seeded random orthonormal rotation ``R_c`` (``S x S``) mixes them, ``U_c = V_c R_c``, so
   that no sub-class is tied to the dominant principal direction.

Each class thus has ``S`` pseudo-subclasses. The student's head outputs ``C * S`` logits
(sub-class ``s`` of class ``c`` at index ``c * S + s``) and is trained with cross-entropy against
soft targets

    q(c, s | x) = softmax(z_t / tau)_c * softmax(((h - mu_c) U_c) / beta)_s,

so each class's sub-classes share exactly the teacher's probability of that class. A class
prediction sums its sub-class probabilities, i.e. class logits are ``logsumexp_s`` of the
sub-class logits. No ground-truth cross-entropy is added (alpha = 0).

Readings of details the paper leaves open (UNVERIFIED, all configurable): PCA per
ground-truth class around its mean; one independent Haar-random rotation per class; the
sub-class split uses the embedding's coordinates ``(h - mu_c) U_c`` (equal to ``(h P - mu_c)
U_c`` since ``U_c`` lies in the null space) with temperature ``beta``; defaults ``S = 4``,
``tau = 2``, ``beta = 1``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.losses.base import DistillLoss
from kd_lightning.methods.teacher_statistics import teacher_embeddings
from kd_lightning.models import StudentSpec, TeacherSpec
from kd_lightning.module import DistillModule
from kd_lightning.outputs import ModelOutputs
from kd_lightning.taps import TapSpec
from kd_lightning.teacher_cache import TeacherCacheConfig
from kd_lightning.training import OptimConfig

EMBEDDING_TAP = "lelp_teacher_embedding"


def null_space_projector(weight: Tensor) -> Tensor:
    """``P = I - W^T (W W^T)^+ W`` for classifier weights ``W`` (``C x d``): ``W P = 0``."""
    w = weight.double()
    return (torch.eye(w.shape[1], dtype=w.dtype) - w.T @ torch.linalg.pinv(w @ w.T) @ w).to(weight.dtype)


def random_rotation(size: int, generator: torch.Generator) -> Tensor:
    """A Haar-random ``size x size`` orthonormal matrix (QR of a Gaussian with sign fix)."""
    q, r = torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()


def class_subspaces(
    embeddings: Tensor, labels: Tensor, classifier_weight: Tensor, subclasses: int, seed: int
) -> tuple[Tensor, Tensor]:
    """``(means (C, d), directions (C, d, S))`` of the LELP pseudo-subclasses (see the module doc)."""
    num_classes, width = classifier_weight.shape
    if subclasses > width - num_classes:
        raise ValueError(f"LELP: {subclasses} sub-classes exceed the null space's dimension {width - num_classes}")
    projected = embeddings.double() @ null_space_projector(classifier_weight.double())
    generator = torch.Generator().manual_seed(seed)
    means, directions = [], []
    for c in range(num_classes):
        rows = projected[labels == c]
        if rows.shape[0] < 2:
            raise ValueError(f"LELP: class {c} has {rows.shape[0]} training example(s); PCA needs at least 2")
        mean = rows.mean(0)
        _, _, vh = torch.linalg.svd(rows - mean, full_matrices=False)
        top = vh[:subclasses].T
        if top.shape[1] < subclasses:
            top = torch.cat([top, torch.zeros(width, subclasses - top.shape[1], dtype=top.dtype)], 1)
        means.append(mean)
        directions.append(top @ random_rotation(subclasses, generator).double())
    return torch.stack(means).float(), torch.stack(directions).float()


def subclass_targets(
    teacher_logits: Tensor, embeddings: Tensor, means: Tensor, directions: Tensor, tau: float, beta: float
) -> Tensor:
    """``q(c, s)`` of shape ``(n, C * S)``: the teacher's class probability (temperature
    ``tau``) split over the class's sub-classes by ``softmax((h - mu_c) U_c / beta)``."""
    class_probs = torch.softmax(teacher_logits.float() / tau, dim=-1)
    coords = torch.einsum("nd,cds->ncs", embeddings.float(), directions) - torch.einsum("cd,cds->cs", means, directions)
    split = torch.softmax(coords / beta, dim=-1)
    return (class_probs.unsqueeze(-1) * split).flatten(1)


def class_logits_from_subclasses(logits: Tensor, num_classes: int) -> Tensor:
    """Class logits whose softmax is the sum of each class's sub-class probabilities."""
    return torch.logsumexp(logits.reshape(*logits.shape[:-1], num_classes, -1), dim=-1)


class LELPLoss(DistillLoss):
    """Cross-entropy of the student's ``C * S`` sub-class logits against LELP's soft targets.

    Its buffers (class means and sub-class directions) are the precomputed teacher statistics,
    saved in the checkpoint; :class:`LELPModule` fills them before training.
    """

    def __init__(self, subclasses: int = 4, tau: float = 2.0, beta: float = 1.0, weight: float = 1.0,
                 name: str | None = "lelp") -> None:
        super().__init__(weight=weight, name=name)
        self.subclasses, self.tau, self.beta = subclasses, tau, beta
        self.register_buffer("has_subspaces", torch.tensor(False))

    def build(self, tap_widths: Mapping[str, int], num_labels: int) -> None:
        width = tap_widths[EMBEDDING_TAP]
        self.register_buffer("means", torch.zeros(num_labels, width))
        self.register_buffer("directions", torch.zeros(num_labels, width, self.subclasses))

    @property
    def required_taps(self) -> tuple[str, ...]:
        return (EMBEDDING_TAP,)

    @torch.no_grad()
    def set_subspaces(self, means: Tensor, directions: Tensor) -> None:
        self.means.copy_(means)
        self.directions.copy_(directions)
        self.has_subspaces.fill_(True)

    def targets(self, teacher: ModelOutputs) -> Tensor:
        return subclass_targets(teacher.logits, teacher.features[EMBEDDING_TAP], self.means, self.directions, self.tau, self.beta)

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | None, batch: Mapping[str, Any]) -> Tensor:
        if not bool(self.has_subspaces):
            raise RuntimeError("LELP: the sub-class subspaces are not computed; train through LELPModule")
        targets = self.targets(teacher)
        return -(targets * F.log_softmax(student.logits.float(), dim=-1)).sum(-1).mean()


class LELPModule(DistillModule):
    """Distillation by LELP (see the module docstring for the method and its readings).

    Args:
        teacher, student, optim, teacher_cache: as for :class:`~kd_lightning.DistillModule`.
        subclasses: ``S``, pseudo-subclasses per class.
        tau: temperature of the teacher's class probabilities.
        beta: temperature of the split over sub-classes.
        rotation_seed: seed of the random rotations.
        head: dotted path of the classification head (the same in teacher and student); its
            input is the embedding ``h``, and the student's copy is replaced by a ``C * S`` head.
        losses: extra losses on top of LELP's (none by default; they see sub-class logits).
    """

    def __init__(
        self,
        teacher: TeacherSpec,
        student: StudentSpec,
        subclasses: int = 4,
        tau: float = 2.0,
        beta: float = 1.0,
        rotation_seed: int = 0,
        head: str = "classifier",
        losses: list[DistillLoss] | None = None,
        optim: OptimConfig | None = None,
        teacher_cache: TeacherCacheConfig | None = None,
    ) -> None:
        lelp = LELPLoss(subclasses, tau=tau, beta=beta)
        taps = {EMBEDDING_TAP: TapSpec("teacher", head, "none", capture="input")}
        super().__init__(teacher, student, [lelp, *(losses or [])], taps=taps, optim=optim, teacher_cache=teacher_cache)
        self.save_hyperparameters(ignore=["losses"])
        self.head_path, self.subclasses, self.rotation_seed = head, subclasses, rotation_seed
        student_head = self.student.get_submodule(head)
        if not isinstance(student_head, nn.Linear):
            raise ValueError(f"LELP: head {head!r} of the student is a {type(student_head).__name__}, not a Linear layer")
        num_classes = self.num_labels
        parent_path, _, attr = head.rpartition(".")
        parent = self.student.get_submodule(parent_path) if parent_path else self.student
        setattr(parent, attr, nn.Linear(student_head.in_features, num_classes * subclasses))
        self.student.config.num_labels = num_classes * subclasses
        self.student.config.lelp = {"num_classes": num_classes, "subclasses": subclasses}

    @property
    def lelp_loss(self) -> LELPLoss:
        return self.losses[0]

    def class_logits(self, logits: Tensor) -> Tensor:
        return class_logits_from_subclasses(logits, self.num_labels)

    def on_fit_start(self) -> None:
        if not bool(self.lelp_loss.has_subspaces):
            embeddings, labels, _ = teacher_embeddings(self, self.trainer.datamodule, EMBEDDING_TAP)
            weight = self.teacher.get_submodule(self.head_path).weight.detach().float().cpu()
            means, directions = class_subspaces(embeddings, labels, weight, self.subclasses, self.rotation_seed)
            self.lelp_loss.set_subspaces(means.to(self.device), directions.to(self.device))
        super().on_fit_start()

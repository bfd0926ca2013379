"""SRD: the student's features through the teacher's own (frozen) classification head.

Yang, Zhu, Bulat, Martinez, Tzimiropoulos (2022), "Knowledge Distillation Meets Open-Set
Semi-Supervised Learning", arXiv:2205.06701 (IJCV 2024): semantic representational
distillation. The teacher's classifier acts as a critic of the student's representation: the
student's penultimate features ``s``, mapped to the teacher's width by a learned student-side
connector ``W``, pass through the teacher's head ``h_t`` (frozen: no gradients reach its
weights, but gradients flow *through* it into ``W`` and the student). The resulting
cross-network logits are matched to the teacher's logits ``z_t``:

    L_SRD = d(h_t(W s), z_t) + lambda_f * ||W s - t||^2 / (n d_t)

with ``d`` the mean squared error over logits (``distance: mse``, as in the official code,
``jingyang2017/SRD_ossl``, ``helper/loops.py``: ``F.mse_loss(logit_tc, logit_t)``) or ``T^2
KL(softmax(z_t / T) || softmax(h_t(W s) / T))`` (``distance: kl``), and the optional feature
term (when a teacher tap ``t`` is given) the official ``statm_loss``, which on pooled ``(n, d)``
features is this mean squared error. The official recipe is ``CE + 1.0 * L_SRD`` with no KD term
(``-a 0 -b 1``).

Readings for text classifiers (UNVERIFIED): ``W`` is one linear map (the official connector is
a 1x1 convolution + BatchNorm + ReLU on CNN feature maps); for BERT-style classifiers the
penultimate features are the pooler's output (``bert.pooler``, ``reduce: none``) and the head is
the teacher's ``classifier`` (its dropout is off: the teacher is in eval mode).

The head is found in the teacher by dotted path(s) (``head``), applied in order to ``W s``;
:class:`SRDModule` binds it before training. Other architectures: point ``head`` at their head
(``score`` for causal-LM classifiers, ``classifier`` for RoBERTa, whose head takes the sequence
output — tap the student's with ``reduce: none`` — or ``[pre_classifier, classifier]`` where no
activation sits between them).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from torch import Tensor, nn

from kd_lightning.losses import functional
from kd_lightning.losses.base import DistillLoss, float32, positive, width_projection
from kd_lightning.models import StudentSpec, TeacherSpec
from kd_lightning.module import DistillModule
from kd_lightning.outputs import ModelOutputs
from kd_lightning.taps import TapSpec, resolve_submodule
from kd_lightning.teacher_cache import TeacherCacheConfig
from kd_lightning.training import OptimConfig


class SRDLoss(DistillLoss):
    """Semantic representational distillation (SRD; see the module docstring).

    ``d(h_t(W s), z_t) + feature_weight * ||W s - t||^2 / (n d_t)``: ``s`` the student tap,
    ``W`` a learned student-side map ``d_s -> d_t`` (``d_t`` the width the teacher's head
    takes), ``h_t`` the frozen teacher head, ``z_t`` the teacher's logits, ``t`` the optional
    teacher tap. Needs :class:`SRDModule`, which hands it the teacher's head.

    Args:
        student: the student tap holding its penultimate features (e.g. ``bert.pooler``,
            ``reduce: none``).
        teacher: an optional teacher tap at the same place; adds the feature term.
        head: dotted path(s) of the teacher's head modules, applied in order.
        distance: ``mse`` (official code) or ``kl`` between cross-network and teacher logits.
        temperature: ``T`` of the ``kl`` distance.
        feature_weight: ``lambda_f`` of the feature term (used when ``teacher`` is set).
        projection: learn ``W``: ``null`` only when the widths differ, ``true`` always,
            ``false`` never (then the widths must agree).
        weight, name: see :class:`~kd_lightning.losses.base.DistillLoss`.
    """

    def __init__(
        self,
        student: str,
        teacher: str | None = None,
        head: str | list[str] = "classifier",
        distance: Literal["mse", "kl"] = "mse",
        temperature: float = 1.0,
        feature_weight: float = 1.0,
        projection: bool | None = None,
        weight: float = 1.0,
        name: str | None = "srd",
    ) -> None:
        super().__init__(weight=weight, name=name)
        if distance not in ("mse", "kl"):
            raise ValueError(f"SRDLoss: distance must be 'mse' or 'kl', got {distance!r}")
        self.student_tap, self.teacher_tap = student, teacher
        self.head_paths = [head] if isinstance(head, str) else list(head)
        if not self.head_paths:
            raise ValueError(
                "SRDLoss: head names no module; give the dotted path of the teacher's head, e.g. classifier"
            )
        self.distance = distance
        self.temperature = positive(temperature, "temperature", type(self).__name__)
        self.feature_weight = float(feature_weight)
        self.project = projection
        self.projection: nn.Linear | None = None
        self.student_width: int | None = None
        self.teacher_width: int | None = None
        self._head: list[nn.Module] | None = None

    @property
    def required_taps(self) -> tuple[str, ...]:
        return (self.student_tap,) if self.teacher_tap is None else (self.student_tap, self.teacher_tap)

    def build(self, tap_widths: Mapping[str, int], num_labels: int) -> None:
        self.student_width = int(tap_widths[self.student_tap])
        if self.teacher_tap is not None:
            self.teacher_width = int(tap_widths[self.teacher_tap])

    def bind_teacher_head(self, teacher: nn.Module) -> None:
        """Find the head in ``teacher`` and create ``W`` for the width it takes. The head stays
        the teacher's: not registered here, so neither trained, nor saved, nor moved twice."""
        head = []
        for path in self.head_paths:
            try:
                head.append(resolve_submodule(teacher, path, "teacher"))
            except ValueError as err:
                raise ValueError(
                    f"SRD: {err} Point SRDLoss's head at the teacher's classification head: its dotted "
                    "path(s), applied in order to the projected student features (classifier for BERT-style "
                    "models, score for causal-LM classifiers, [pre_classifier, classifier] for DistilBERT)."
                ) from None
        linears = [m for module in head for m in module.modules() if isinstance(m, nn.Linear)]
        width = linears[0].in_features if linears else self.teacher_width
        if width is None:
            raise ValueError(
                f"SRD: the teacher head {self.head_paths} has no Linear layer to read its input width from; "
                "declare a teacher tap at the head's input (SRDLoss teacher: <tap>) so the width is known"
            )
        if self.teacher_width is not None and self.teacher_width != width:
            raise ValueError(
                f"SRD: teacher tap {self.teacher_tap!r} has width {self.teacher_width} but the head "
                f"{self.head_paths} takes {width}; tap the head's input (e.g. bert.pooler with reduce: none)"
            )
        if self.student_width is None:
            raise RuntimeError(
                "SRD: the loss is not built yet (its tap widths are unknown); bind after DistillModule.__init__"
            )
        self.projection = width_projection(
            self.student_width,
            width,
            self.project,
            f"SRD: student tap {self.student_tap!r} has width {self.student_width} but the teacher head "
            f"takes {width}; allow the projection (projection: true or null)",
        )
        self.teacher_width = width
        object.__setattr__(self, "_head", head)  # the teacher's modules, not this loss's

    def teacher_head(self, features: Tensor) -> Tensor:
        """The teacher's head applied to ``features`` (already at the teacher's width)."""
        if self._head is None:
            raise RuntimeError(
                "SRDLoss: the teacher's head is not bound; train with model class_path "
                "kd_lightning.methods.SRDModule, which hands SRD losses the teacher's head"
            )
        parameter = next((p for module in self._head for p in module.parameters()), None)
        out = features if parameter is None else features.to(parameter.dtype)
        for module in self._head:
            out = module(out)
        return out

    def cross_logits(self, student: ModelOutputs) -> tuple[Tensor, Tensor]:
        """``(W s, h_t(W s))`` for the student's tapped features."""
        s = float32(student.features[self.student_tap])
        projected = self.projection(s.to(self.projection.weight.dtype)) if self.projection is not None else s
        return projected, self.teacher_head(projected)

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | None, batch: Mapping[str, Any]) -> Tensor:
        projected, logits = self.cross_logits(student)
        z_x = float32(logits)
        z_t = float32(teacher.logits).to(z_x.dtype)
        if self.distance == "mse":
            loss = (z_x - z_t).square().mean()
        else:
            loss = functional.kl_divergence(z_x, z_t, self.temperature)
        if self.teacher_tap is not None and self.feature_weight != 0:
            t = float32(teacher.features[self.teacher_tap]).to(z_x.dtype)
            loss = loss + self.feature_weight * functional.projected_mse(float32(projected).to(z_x.dtype), t)
        return loss

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, student={self.student_tap!r}, teacher={self.teacher_tap!r}, "
            f"head={self.head_paths}, distance={self.distance!r}"
        )


class SRDModule(DistillModule):
    """Distillation with SRD losses: a :class:`~kd_lightning.DistillModule` that hands every
    :class:`SRDLoss` in ``losses`` the teacher's (frozen) classification head.

    The head's weights stay the teacher's: frozen, outside the optimiser and the student's
    checkpoint. SRD reads the teacher's logits and taps only, so it works with the teacher cache.

    Args: as for :class:`~kd_lightning.DistillModule`; ``losses`` must hold at least one
    :class:`SRDLoss` (the official recipe: ``CrossEntropy`` + ``SRDLoss``).
    """

    def __init__(
        self,
        teacher: TeacherSpec,
        student: StudentSpec,
        losses: list[DistillLoss],
        taps: dict[str, TapSpec] | None = None,
        optim: OptimConfig | None = None,
        save_teacher: bool = False,
        teacher_cache: TeacherCacheConfig | None = None,
        nonfinite: Literal["raise", "skip"] = "raise",
    ) -> None:
        super().__init__(
            teacher, student, losses, taps=taps, optim=optim, save_teacher=save_teacher,
            teacher_cache=teacher_cache, nonfinite=nonfinite,
        )  # fmt: skip
        self.save_hyperparameters(ignore=["losses"])
        srd = [loss for loss in self.losses if isinstance(loss, SRDLoss)]
        if not srd:
            raise ValueError(
                "SRDModule: no SRDLoss among the losses; add one, e.g. class_path: kd_lightning.methods.SRDLoss "
                "with init_args {student: <tap on the student's penultimate features>}"
            )
        for loss in srd:
            loss.bind_teacher_head(self.teacher)

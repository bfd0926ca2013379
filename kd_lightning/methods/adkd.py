"""AD-KD: attribution-driven distillation with integrated gradients.

Wu, Chen, Quan, Wang, Wang (2023), "AD-KD: Attribution-Driven Knowledge Distillation for
Language Model Compression", ACL 2023, arXiv:2305.10010; reference code ``brucewsy/AD-KD``
(``loss.py``).

For each example, a view ``c`` (a class) and each model, integrated gradients (IG) attribute the
class score ``f_c`` to the input embeddings ``x`` (the output of the embedding layer, ``(seq,
d)``) along the straight path from a baseline ``x'``, with ``m`` right Riemann steps:

    IG_c(x) = (x - x') * 1/m sum_{k=1..m} grad_z f_c(z) at z = x' + (k/m) (x - x').

Each token's attribution is the L2 norm of its row of ``IG`` over the embedding dimensions (for
the teacher optionally over its ``teacher_dims`` largest ``|IG|`` dimensions only, the paper's
attribution-dimension selection), padding is set to zero, and each map is L2-normalised over
the tokens: ``a_c = A_c / ||A_c||_2``. The student matches the teacher's maps, summed over views
and averaged over examples:

    L_attr = 1/n sum_i sum_c || a_c^t(x_i) - a_c^s(x_i) ||_2             (distance: l2)
    L_attr = sum_c sum_i ||a_c^t(x_i) - a_c^s(x_i)||_2^2 / (real tokens)  (distance: mse, the code's "L2")

Views ("multi-view attribution"): every class (``classes: null``), or per example the teacher's
``K`` most probable classes (``classes: K``); the student's attributions use the teacher's
classes. ``f_c`` is ``log p_c`` by default (the reference code differentiates ``-log p_c``;
the sign and scale vanish in the normalised norms), or ``p_c`` or the logit ``z_c``.

The teacher's IG runs with gradients with respect to its inputs only (its weights stay frozen);
the student's is differentiable (``create_graph``), so ``L_attr`` trains the student through
its input gradients (a second-order term). The objective is ``CE + KD + beta L_attr`` with the
losses given (by default ``0.2 CE + 0.8 KD (T = 2)``, the reference SST-2 script's
``alpha = 0.8``) and ``beta = attribution_weight``.

Why a ``DistillModule`` subclass: the attributions need the models themselves (gradients with
respect to their embedding outputs at ``m`` points of the path), which a loss, given only the
two models' outputs, cannot reach. :class:`ADKDModule` runs both IG passes in its training
step and hands the maps to :class:`AttributionLoss` as an extra feature of each side's
outputs; the pass at the input itself (``alpha = 1``, computed first) gives both models' logits
and taps for the other losses, so no separate forward pass is needed. It needs the live teacher
each step (no teacher cache).

Readings (UNVERIFIED, all configurable): baseline ``zeros`` (the reference code scales the
embedding layer's output by ``alpha``: a zero baseline after position embeddings and LayerNorm;
``pad`` uses the embedding of ``[PAD]`` at every position instead); ``steps = 1`` (the released
scripts' one-step attribution; the paper reports a small ``m`` suffices); distance ``l2`` (the
paper's norm; ``mse`` is the code's squared error per real token); ``teacher_dims = None`` (all
dimensions).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from kd_lightning.losses.base import DistillLoss
from kd_lightning.losses.logits import CrossEntropy, KLDivergence
from kd_lightning.models import StudentSpec, TeacherSpec
from kd_lightning.module import DistillModule
from kd_lightning.outputs import ModelOutputs
from kd_lightning.taps import TapSpec, resolve_submodule
from kd_lightning.training import OptimConfig, model_inputs

#: Key of the raw IG tensor ``(batch, views, seq, width)`` in each side's ``ModelOutputs.features``.
ATTRIBUTIONS = "adkd_attributions"

Baseline = Literal["zeros", "pad"]
ClassScore = Literal["log_prob", "prob", "logit"]
Distance = Literal["l2", "mse"]


# ---- integrated gradients ---------------------------------------------------------------------
def class_scores(logits: Tensor, score: ClassScore = "log_prob") -> Tensor:
    """``f_c`` for every class: ``log p_c``, ``p_c`` or the logit ``z_c``, in float32 or better."""
    z = logits if logits.dtype == torch.float64 else logits.float()
    if score == "log_prob":
        return F.log_softmax(z, -1)
    if score == "prob":
        return torch.softmax(z, -1)
    if score == "logit":
        return z
    raise ValueError(f"unknown class score {score!r}; choose log_prob, prob or logit")


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once the embedding layer has run."""


class EmbeddingPath:
    """A forward hook that replaces the output ``x`` of an embedding layer by the point
    ``x' + alpha (x - x')`` of the straight path from the baseline ``x'`` (zeros when ``None``),
    and records ``x`` and that point. ``detach`` makes the point a fresh leaf (a frozen model's
    inputs); otherwise the point stays attached to the layer's weights."""

    def __init__(self, layer: nn.Module, baseline: Tensor | None = None, detach: bool = False) -> None:
        self.layer, self.baseline, self.detach = layer, baseline, detach
        self.alpha = 1.0
        self.input: Tensor | None = None
        self.point: Tensor | None = None

    def _hook(self, module: nn.Module, args: Any, output: Any) -> Tensor:
        if not isinstance(output, Tensor):
            raise TypeError(
                f"AD-KD: the embedding layer {type(module).__name__} returns a {type(output).__name__}, not a tensor; "
                "set embeddings to a module whose output is the (batch, seq, width) input embedding"
            )
        base = torch.zeros_like(output) if self.baseline is None else self.baseline.to(output.dtype)
        point = base + self.alpha * (output - base)
        if self.detach:
            point = point.detach().requires_grad_(True)
        self.input, self.point = output, point
        return point

    def __enter__(self) -> EmbeddingPath:
        self._handle = self.layer.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._handle.remove()


@torch.no_grad()
def pad_baseline(model: nn.Module, layer: nn.Module, inputs: Mapping[str, Tensor], pad_token_id: int) -> Tensor:
    """The embedding layer's output when every input id is ``pad_token_id`` (positions, token
    types and mask kept); the rest of the model does not run."""
    captured: dict[str, Tensor] = {}

    def capture(module: nn.Module, args: Any, output: Any) -> None:
        captured["x"] = output.detach() if isinstance(output, Tensor) else output
        raise _StopForward

    handle = layer.register_forward_hook(capture)
    try:
        model(**{**inputs, "input_ids": torch.full_like(inputs["input_ids"], pad_token_id)})
    except _StopForward:
        pass
    finally:
        handle.remove()
    return captured["x"]


@dataclass
class Attributions:
    """What :func:`integrated_gradients` returns.

    Attributes:
        logits: ``(batch, classes)`` at the input itself (the pass with ``alpha = 1``), attached
            to that pass's graph.
        targets: ``(batch, views)`` the class of each view.
        attributions: ``(batch, views, seq, width)`` integrated gradients.
    """

    logits: Tensor
    targets: Tensor
    attributions: Tensor


def resolve_targets(logits: Tensor, targets: Tensor | int | None) -> Tensor:
    """``(batch, views)`` classes: every class (``None``), the ``K`` highest-scoring ones per row
    (``int``, best first), or ``targets`` as given."""
    n, num_classes = logits.shape
    if targets is None:
        return torch.arange(num_classes, device=logits.device).expand(n, num_classes)
    if isinstance(targets, int):
        if not 1 <= targets <= num_classes:
            raise ValueError(
                f"AD-KD: classes={targets} views, but the model has {num_classes} classes; use 1..{num_classes} or null (all)"
            )
        return logits.detach().topk(targets, dim=-1).indices
    return targets.to(logits.device, torch.long)


def integrated_gradients(
    model: nn.Module,
    embeddings: nn.Module,
    inputs: Mapping[str, Tensor],
    steps: int = 1,
    targets: Tensor | int | None = None,
    baseline: Baseline = "zeros",
    score: ClassScore = "log_prob",
    create_graph: bool = False,
    pad_token_id: int | None = None,
    on_input: Callable[[], None] | None = None,
) -> Attributions:
    """Integrated gradients of ``f_c`` (``score``) for every view, with respect to the output of
    ``embeddings`` (see the module docstring). Points ``alpha = 1, (m-1)/m, ..., 1/m``: the first
    pass is at the input itself, and gives the logits (and the classes when ``targets`` is an
    ``int``); ``on_input`` is called right after it (to collect tapped features before later
    passes overwrite them).

    ``create_graph=False``: the point is a leaf, so only input gradients are taken (a frozen
    teacher: its weights get none) and the result is detached. ``create_graph=True``: the
    result stays differentiable with respect to the model's weights (the student).
    """
    if steps < 1:
        raise ValueError(f"AD-KD: steps must be >= 1, got {steps}")
    base = None
    if baseline == "pad":
        if pad_token_id is None:
            raise ValueError("AD-KD: baseline 'pad' needs the tokenizer's pad_token_id; use baseline: zeros")
        base = pad_baseline(model, embeddings, inputs, pad_token_id)
    elif baseline != "zeros":
        raise ValueError(f"AD-KD: unknown baseline {baseline!r}; choose zeros or pad")
    path = EmbeddingPath(embeddings, base, detach=not create_graph)
    total: Tensor | None = None
    logits = x = views = None
    for k in range(steps, 0, -1):
        path.alpha = k / steps
        # Fused attention kernels (flash, memory-efficient) have no second derivative; the math one does.
        kernels = sdpa_kernel(SDPBackend.MATH) if create_graph else contextlib.nullcontext()
        with path, kernels:
            out = model(**inputs).logits
        if k == steps:
            logits, x = out, path.input
            views = resolve_targets(out, targets)
            if on_input is not None:
                on_input()
        scores = class_scores(out, score)
        grads = []
        for v in range(views.shape[1]):
            f = scores.gather(1, views[:, v : v + 1]).sum()  # rows are independent: the sum's gradient is per row
            retain = create_graph or v < views.shape[1] - 1
            grads.append(torch.autograd.grad(f, path.point, retain_graph=retain, create_graph=create_graph)[0])
        step = torch.stack(grads, 1)  # (batch, views, seq, width)
        total = step if total is None else total + step
    base_x = torch.zeros_like(x) if base is None else base.to(x.dtype)
    ig = (x - base_x).unsqueeze(1) * total / steps
    if not create_graph:
        ig = ig.detach()
    return Attributions(logits=logits, targets=views, attributions=ig)


# ---- the matching loss --------------------------------------------------------------------------
def token_attributions(ig: Tensor, top_dims: int | None = None) -> Tensor:
    """``(..., seq, width)`` IG to ``(..., seq)`` token attributions: the L2 norm over the width,
    or over the ``top_dims`` largest ``|IG|`` entries of each token."""
    if top_dims is not None and top_dims < ig.shape[-1]:
        ig = ig.abs().topk(top_dims, dim=-1).values
    return torch.linalg.vector_norm(ig, dim=-1)


def normalised_map(attributions: Tensor, mask: Tensor | None, eps: float = 1e-12) -> Tensor:
    """``(batch, views, seq)`` attributions with padding (``mask`` false) zeroed, each map
    divided by its L2 norm over the tokens (``eps`` guards an all-zero map)."""
    if mask is not None:
        attributions = attributions * mask[:, None, :].to(attributions.dtype)
    norm = torch.linalg.vector_norm(attributions, dim=-1, keepdim=True)
    return attributions / norm.clamp_min(eps)


def attribution_distance(
    teacher_map: Tensor, student_map: Tensor, mask: Tensor | None, distance: Distance = "l2"
) -> Tensor:
    """Distance between normalised ``(batch, views, seq)`` maps, summed over views: ``l2`` the
    mean over examples of ``||a^t - a^s||_2``; ``mse`` the squared differences summed over
    examples and tokens, divided by the number of real tokens."""
    if distance == "l2":
        return torch.linalg.vector_norm(teacher_map - student_map, dim=-1).sum(1).mean()
    if distance == "mse":
        tokens = mask.sum() if mask is not None else teacher_map.shape[0] * teacher_map.shape[-1]
        return (teacher_map - student_map).square().sum() / max(float(tokens), 1.0)
    raise ValueError(f"unknown attribution distance {distance!r}; choose l2 or mse")


class AttributionLoss(DistillLoss):
    """AD-KD's attribution term (Wu et al., ACL 2023, arXiv:2305.10010; see the module docstring).

    ``sum_c || a_c^t - a_c^s ||`` between the teacher's and the student's per-token attribution
    maps (L2 norm of IG over the embedding width, teacher optionally over its ``teacher_dims``
    largest dimensions; padding zeroed; unit L2 norm over tokens). Reads the raw IG that
    :class:`ADKDModule` stores under :data:`ATTRIBUTIONS` in each side's features.

    Args:
        teacher_dims: keep the teacher's ``K`` largest ``|IG|`` dimensions per token (``null``: all).
        distance: ``l2`` (per example, averaged) or ``mse`` (squared, per real token).
        weight, name: see :class:`~kd_lightning.losses.base.DistillLoss`.
    """

    def __init__(
        self,
        teacher_dims: int | None = None,
        distance: Distance = "l2",
        weight: float = 1.0,
        name: str | None = "attribution",
    ) -> None:
        super().__init__(weight=weight, name=name)
        if distance not in ("l2", "mse"):
            raise ValueError(f"AttributionLoss: distance must be 'l2' or 'mse', got {distance!r}")
        if teacher_dims is not None and teacher_dims < 1:
            raise ValueError(
                f"AttributionLoss: teacher_dims must be a positive number of dimensions or null, got {teacher_dims}"
            )
        self.teacher_dims, self.distance = teacher_dims, distance

    def maps(self, student: ModelOutputs, teacher: ModelOutputs, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """The normalised ``(batch, views, seq)`` maps of the teacher and the student."""
        if ATTRIBUTIONS not in student.features or ATTRIBUTIONS not in teacher.features:
            raise RuntimeError(
                "AttributionLoss reads the integrated gradients that ADKDModule computes; train with model "
                "class_path kd_lightning.methods.ADKDModule (it adds this loss itself)"
            )
        t_ig, s_ig = teacher.features[ATTRIBUTIONS], student.features[ATTRIBUTIONS]
        dtype = torch.float64 if s_ig.dtype == torch.float64 else torch.float32
        t_map = normalised_map(token_attributions(t_ig.to(dtype), self.teacher_dims), mask)
        s_map = normalised_map(token_attributions(s_ig.to(dtype)), mask)
        return t_map, s_map

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | None, batch: Mapping[str, Any]) -> Tensor:
        mask = student.attention_mask if student.attention_mask is not None else batch.get("attention_mask")
        t_map, s_map = self.maps(student, teacher, mask)
        return attribution_distance(t_map, s_map, mask, self.distance)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, teacher_dims={self.teacher_dims}, distance={self.distance!r}"


# ---- the module -------------------------------------------------------------------------------------
def embedding_layer_path(model: nn.Module, path: str | None, owner: str) -> str:
    """``path`` checked in ``model``, or ``<base_model_prefix>.embeddings`` (BERT, RoBERTa,
    ELECTRA, DistilBERT); an error naming the setting when neither exists."""
    if path is not None:
        try:
            resolve_submodule(model, path, owner)
        except ValueError as err:
            raise ValueError(f"AD-KD: embeddings {path!r} is not a module of the {owner}: {err}") from None
        return path
    prefix = getattr(model, "base_model_prefix", "")
    candidate = f"{prefix}.embeddings" if prefix else "embeddings"
    if candidate in dict(model.named_modules()):
        return candidate
    raise ValueError(
        f"AD-KD: cannot find the {owner}'s embedding layer ({type(model).__name__} has no {candidate!r}); set "
        "model.init_args.embeddings to the dotted path of the module whose output is the input embedding "
        "(e.g. bert.embeddings); `python -m kd_lightning modules <model>` lists the paths"
    )


class ADKDModule(DistillModule):
    """Distillation by AD-KD (see the module docstring for the method and its readings).

    Args:
        teacher, student, taps, optim, nonfinite: as for :class:`~kd_lightning.DistillModule`.
        losses: the other losses (default ``[CrossEntropy(0.2), KLDivergence(0.8, T=2)]``).
        steps: ``m``, Riemann steps of integrated gradients.
        classes: views: ``null`` every class (multi-view), or the teacher's top ``K`` per example.
        teacher_dims: see :class:`AttributionLoss`.
        baseline: ``zeros`` or ``pad`` (see the module docstring).
        score: the attributed class score: ``log_prob``, ``prob`` or ``logit`` (regression: ``logit``).
        distance: ``l2`` or ``mse`` (see :class:`AttributionLoss`).
        attribution_weight: ``beta``, the weight of the attribution term.
        embeddings: dotted path of the embedding layer in both models (default
            ``<base_model_prefix>.embeddings``, e.g. ``bert.embeddings``).
    """

    def __init__(
        self,
        teacher: TeacherSpec,
        student: StudentSpec,
        losses: list[DistillLoss] | None = None,
        taps: dict[str, TapSpec] | None = None,
        optim: OptimConfig | None = None,
        steps: int = 1,
        classes: int | None = None,
        teacher_dims: int | None = None,
        baseline: Baseline = "zeros",
        score: ClassScore = "log_prob",
        distance: Distance = "l2",
        attribution_weight: float = 1.0,
        embeddings: str | None = None,
        nonfinite: Literal["raise", "skip"] = "raise",
    ) -> None:
        if int(steps) < 1:
            raise ValueError(f"ADKDModule: steps must be a positive number of integration steps, got {steps}")
        if baseline not in ("zeros", "pad"):
            raise ValueError(f"ADKDModule: baseline must be 'zeros' or 'pad', got {baseline!r}")
        if score not in ("log_prob", "prob", "logit"):
            raise ValueError(f"ADKDModule: score must be log_prob, prob or logit, got {score!r}")
        if losses is None:
            losses = [CrossEntropy(weight=0.2), KLDivergence(weight=0.8, temperature=2.0)]
        attribution = AttributionLoss(teacher_dims=teacher_dims, distance=distance, weight=attribution_weight)
        super().__init__(teacher, student, [attribution, *losses], taps=taps, optim=optim, nonfinite=nonfinite)
        self.save_hyperparameters(ignore=["losses"])
        if classes is not None and not 1 <= int(classes) <= self.num_labels:
            raise ValueError(
                f"ADKDModule: classes={classes} but the task has {self.num_labels}; use 1..{self.num_labels} or null (all)"
            )
        if self.num_labels == 1 and score != "logit":
            raise ValueError(
                "ADKDModule: a regression task has one output, whose softmax is constant; set score: logit"
            )
        if baseline == "pad" and self.tokenizer.pad_token_id is None:
            raise ValueError("ADKDModule: baseline 'pad' needs a tokenizer with a pad token; use baseline: zeros")
        self.steps, self.classes, self.baseline, self.score = int(steps), classes, baseline, score
        self.teacher_embeddings = embedding_layer_path(self.teacher, embeddings, "teacher")
        self.student_embeddings = embedding_layer_path(self.student, embeddings, "student")

    @property
    def attribution_loss(self) -> AttributionLoss:
        return self.losses[0]

    def attribution_outputs(self, batch: Mapping[str, Any]) -> tuple[ModelOutputs, ModelOutputs]:
        """``(teacher, student)`` outputs at the input, each with its raw IG under
        :data:`ATTRIBUTIONS`: the teacher's detached, the student's differentiable."""
        inputs = model_inputs(batch)
        mask = batch.get("attention_mask")
        found: dict[str, dict[str, Tensor]] = {}
        settings = {"steps": self.steps, "baseline": self.baseline, "score": self.score,
                    "pad_token_id": self.tokenizer.pad_token_id}  # fmt: skip

        self.teacher_taps.clear()
        with torch.enable_grad():  # gradients with respect to the teacher's inputs; its weights are frozen
            t = integrated_gradients(
                self.teacher, self.teacher.get_submodule(self.teacher_embeddings), inputs, targets=self.classes,
                create_graph=False, on_input=lambda: found.update(teacher=self.teacher_taps.collect(mask)), **settings,
            )  # fmt: skip
        self.teacher_taps.clear()
        self.student_taps.clear()
        s = integrated_gradients(
            self.student, self.student.get_submodule(self.student_embeddings), inputs, targets=t.targets,
            create_graph=True, on_input=lambda: found.update(student=self.student_taps.collect(mask)), **settings,
        )  # fmt: skip
        self.student_taps.clear()
        teacher_features = {k: v.detach() for k, v in found["teacher"].items()}
        teacher = ModelOutputs(
            logits=t.logits.detach(), features={**teacher_features, ATTRIBUTIONS: t.attributions}, attention_mask=mask
        )
        student = ModelOutputs(
            logits=s.logits, features={**found["student"], ATTRIBUTIONS: s.attributions}, attention_mask=mask
        )
        return teacher, student

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor | None:
        teacher, student = self.attribution_outputs(batch)
        terms = self.loss_terms(student, teacher, batch)
        total = sum(loss.weight * terms[loss.name] for loss in self.losses)
        return self.checked_total(terms, total, batch, student.logits.shape[0])

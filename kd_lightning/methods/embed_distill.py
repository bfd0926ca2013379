"""EmbedDistill: geometric distillation of a dual-encoder retriever.

Kim, Rawat, Zaheer, Jayasumana, Sadhanala, Jitkrittum, Menon, Fergus, Kumar (2023),
"EmbedDistill: A Geometric Knowledge Distillation for Information Retrieval", arXiv:2301.12005.

A dual encoder embeds a query ``q`` and a document ``d`` separately and scores them by the inner
product ``s(q, d) = <e_q, e_d>``. Here an encoder is a Hugging Face encoder whose token states
are pooled (mean over real tokens, as sentence-transformers does for all-MiniLM-L6-v2, or the
first token) and, by default, L2-normalised (scores are then cosines); one encoder embeds both
queries and documents. For a batch of ``n`` pairs ``(q_i, d_i)`` the other documents are the
in-batch negatives, and teacher and student give score matrices ``S_t, S_s`` (``n x n``,
``S[i, j] = s(q_i, d_j)``). Score distillation alone passes on ``n`` numbers per query; EmbedDistill
also matches the embeddings themselves, which carry the teacher's geometry:

- :class:`ScoreDistillation`, ``1/n sum_i KL(softmax(S_t[i] / T) || softmax(S_s[i] / T))``;
- :class:`EmbeddingMatching`, ``1/n sum_i ||e_t(x_i) - P e_s(x_i)||^2`` for the queries and for
  the documents, ``P`` a learned linear map ``d_s -> d_t`` when the widths differ (identity
  otherwise);
- :class:`InBatchContrastive`, the task loss on the labels (which document is the pair's):
  ``-1/n sum_i log softmax(S_s[i] / tau)[i]``, the other copies of a pair's own document (same
  ``document_id``) left out of its negatives.

:class:`EmbedDistillModule` runs both encoders on each batch and hands these losses
``ModelOutputs`` whose ``logits`` are the score matrix and whose ``features`` are the ``query``
and ``document`` embeddings. It evaluates recall@k of the student (every validation step) and of
the teacher (once at fit start, and at test) over each split's own documents.

Readings (UNVERIFIED where the paper leaves a choice; each is a knob): the embedding distance
is the squared Euclidean distance between the embeddings that are scored (normalised when
``normalize`` is set); the score distillation is the plain KL (no ``T^2`` factor); the
contrastive task loss is not part of the paper's distillation objective, so it is an optional
term (the offline config adds it as the analogue of the classification recipes' cross-entropy).
The paper's asymmetric students (the teacher's document encoder inherited and frozen) and its
query generation are not implemented: the student here is one encoder for both sides.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AutoModel, PreTrainedModel

from kd_lightning.data.retrieval import SIDES, side_inputs
from kd_lightning.losses.base import DistillLoss, float32, positive, width_projection
from kd_lightning.metrics.retrieval import retrieval_metrics
from kd_lightning.models import StudentSpec, TeacherSpec, resolve_model_path
from kd_lightning.models.building import build_headless_student
from kd_lightning.module import DistillModule
from kd_lightning.outputs import ModelOutputs
from kd_lightning.taps import reduce_hidden
from kd_lightning.training import OptimConfig

#: The keys under which :class:`EmbedDistillModule` gives its losses' ``build`` the embedding widths.
STUDENT_WIDTH, TEACHER_WIDTH = "student_embedding", "teacher_embedding"


def _score_matrices(student: ModelOutputs, teacher: ModelOutputs | None, owner: str) -> tuple[Tensor, Tensor]:
    s, t = float32(student.logits), float32(teacher.logits) if teacher is not None else None
    if t is None or s.dim() != 2 or s.shape != t.shape:
        shapes = (tuple(s.shape), None if t is None else tuple(t.shape))
        raise ValueError(
            f"{owner} compares (queries, documents) score matrices of one shape, got student/teacher {shapes}"
        )
    return s, t


class ScoreDistillation(DistillLoss):
    """Score distillation over in-batch documents (EmbedDistill, arXiv:2301.12005).

    ``1/n sum_i KL(softmax(S_t[i] / T) || softmax(S_s[i] / T))``: each query's distribution over
    the batch's documents, teacher first; ``S[i, j] = <e(q_i), e(d_j)>``. No ``T^2`` factor.

    Args:
        temperature: ``T``; scores of normalised embeddings are cosines in [-1, 1], so a small
            ``T`` (0.05, the scale 20 of sentence-transformers' in-batch loss) gives peaked
            distributions.
        weight, name: see :class:`~kd_lightning.losses.base.DistillLoss`.
    """

    def __init__(self, temperature: float = 0.05, weight: float = 1.0, name: str | None = None) -> None:
        super().__init__(weight=weight, name=name)
        self.temperature = positive(temperature, "temperature", type(self).__name__)

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | None, batch: Mapping[str, Any]) -> Tensor:
        s, t = _score_matrices(student, teacher, type(self).__name__)
        log_p_s = F.log_softmax(s / self.temperature, dim=-1)
        log_p_t = F.log_softmax(t / self.temperature, dim=-1)
        return (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1).mean()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, temperature={self.temperature}"


class EmbeddingMatching(DistillLoss):
    """Embedding matching of EmbedDistill (arXiv:2301.12005) for queries or documents.

    ``1/n sum_i ||e_t(x_i) - P e_s(x_i)||^2`` over the batch's queries (``side: query``) or
    documents (``side: document``), ``e`` the embeddings the encoders score with. ``P`` is a
    learned linear map ``d_s -> d_t`` (no bias; trained and saved with the student, not part of
    the exported encoder), used when the widths differ unless ``projection`` says otherwise;
    without it the loss is zero exactly when the student embeds like the teacher.

    Args:
        side: ``query`` or ``document``.
        projection: ``null``: learn ``P`` only when the widths differ; ``true`` always; ``false`` never.
        weight, name: see :class:`~kd_lightning.losses.base.DistillLoss`; the name defaults to
            ``<side>_embedding_matching``.
    """

    def __init__(
        self,
        side: Literal["query", "document"] = "query",
        projection: bool | None = None,
        weight: float = 1.0,
        name: str | None = None,
    ) -> None:
        if side not in SIDES:
            raise ValueError(f"EmbeddingMatching: side must be 'query' or 'document', got {side!r}")
        super().__init__(weight=weight, name=name or f"{side}_embedding_matching")
        self.side = side
        self.project = projection
        self.projection: nn.Linear | None = None

    def build(self, tap_widths: Mapping[str, int], num_labels: int) -> None:
        if STUDENT_WIDTH not in tap_widths or TEACHER_WIDTH not in tap_widths:
            raise ValueError(
                f"loss {self.name!r}: EmbeddingMatching compares dual-encoder embeddings; use it in "
                "kd_lightning.methods.EmbedDistillModule"
            )
        width_s, width_t = tap_widths[STUDENT_WIDTH], tap_widths[TEACHER_WIDTH]
        self.projection = width_projection(
            width_s,
            width_t,
            self.project,
            f"loss {self.name!r}: student embeddings have width {width_s}, the teacher's {width_t}; "
            "allow a projection (projection: true or null)",
        )

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | None, batch: Mapping[str, Any]) -> Tensor:
        s, t = float32(student.features[self.side]), float32(teacher.features[self.side])
        if self.projection is not None:
            s = self.projection(s.to(self.projection.weight.dtype))
        return (t - s).pow(2).sum(-1).mean()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, side={self.side!r}, projection={self.projection is not None}"


class InBatchContrastive(DistillLoss):
    """The dual encoder's task loss: in-batch softmax cross-entropy towards each query's own document.

    ``-1/n sum_i log softmax(S_s[i] / tau)[i]`` with ``S_s[i, j] = <e_s(q_i), e_s(d_j)>``; the
    other columns are in-batch negatives, except those holding the same document as the pair
    (``batch['document_id']`` equal, e.g. one FAQ answer to several questions), which are left out.
    Uses the labels only (no teacher). Karpukhin et al. (2020), "Dense Passage Retrieval for
    Open-Domain Question Answering" (EMNLP), is the usual reference for this loss.

    Args:
        temperature: ``tau`` (0.05: the scale 20 of sentence-transformers' loss).
        weight, name: see :class:`~kd_lightning.losses.base.DistillLoss`.
    """

    needs_teacher = False

    def __init__(self, temperature: float = 0.05, weight: float = 1.0, name: str | None = None) -> None:
        super().__init__(weight=weight, name=name)
        self.temperature = positive(temperature, "temperature", type(self).__name__)

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | None, batch: Mapping[str, Any]) -> Tensor:
        scores = float32(student.logits) / self.temperature
        n = scores.shape[0]
        if scores.dim() != 2 or scores.shape[1] != n:
            raise ValueError(
                f"InBatchContrastive needs a square (queries, documents) score matrix, got {tuple(scores.shape)}"
            )
        ids = batch.get("document_id")
        if ids is not None:
            duplicate = (ids[:, None] == ids[None, :]) & ~torch.eye(n, dtype=torch.bool, device=scores.device)
            scores = scores.masked_fill(duplicate, float("-inf"))
        return F.cross_entropy(scores, torch.arange(n, device=scores.device))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, temperature={self.temperature}"


def load_encoder(name_or_path: str) -> PreTrainedModel:
    """The base encoder (``AutoModel``, no task head) of a hub name, folder or packaged key."""
    return AutoModel.from_pretrained(resolve_model_path(name_or_path))


class EmbedDistillModule(DistillModule):
    """Distillation of a dual-encoder retriever by EmbedDistill (see the module docstring).

    Args:
        teacher: the teacher encoder (``name_or_path``: hub name, folder or the packaged
            sentence encoder ``all-MiniLM-L6-v2``); ``num_labels`` does not apply.
        student: its first or chosen layers (``from_teacher_layers``), a checkpoint, or a
            config override (random initialisation).
        losses: default ``[ScoreDistillation(), EmbeddingMatching('query'),
            EmbeddingMatching('document')]``; add :class:`InBatchContrastive` for the labels.
        pooling: ``mean`` over real tokens, or ``cls`` (the first token).
        normalize: L2-normalise the pooled embeddings (scores are cosines).
        optim, save_teacher, nonfinite: as for :class:`~kd_lightning.DistillModule`.

    Validation logs the student's ``val/recall@k`` (and ``val/teacher/recall@k`` once at fit
    start), test ``test/recall@k`` and ``test/teacher/recall@k``; ``predict`` returns the
    student's query and document embeddings. The exported student is the encoder alone:
    retrieval with it pools (and normalises) as configured here.
    """

    def __init__(
        self,
        teacher: TeacherSpec,
        student: StudentSpec,
        losses: list[DistillLoss] | None = None,
        pooling: Literal["mean", "cls"] = "mean",
        normalize: bool = True,
        optim: OptimConfig | None = None,
        save_teacher: bool = False,
        nonfinite: Literal["raise", "skip"] = "raise",
    ) -> None:
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
        if teacher.num_labels is not None:
            raise ValueError(
                f"teacher.num_labels={teacher.num_labels}: a dual encoder has no classes; remove num_labels from the teacher"
            )
        # Read by _probe_tap_widths during DistillModule.__init__.
        self.pooling, self.normalize = pooling, bool(normalize)
        losses = losses or [ScoreDistillation(), EmbeddingMatching("query"), EmbeddingMatching("document")]
        super().__init__(teacher, student, losses, optim=optim, save_teacher=save_teacher, nonfinite=nonfinite)
        self.save_hyperparameters(ignore=["losses"])
        metrics = retrieval_metrics()
        for name in self.task_metric_collections:
            setattr(self, name, metrics.clone(prefix=getattr(self, name).prefix))

    # ---- the two encoders ------------------------------------------------------------------------
    def load_teacher(self, spec: TeacherSpec) -> PreTrainedModel:
        return load_encoder(spec.name_or_path)

    def build_student_model(self, spec: StudentSpec, teacher: PreTrainedModel) -> PreTrainedModel:
        return build_headless_student(spec, teacher, load_encoder, AutoModel)

    def shared_outputs(self, teacher: PreTrainedModel, student: PreTrainedModel) -> int:
        """The width of the teacher's embeddings (what the student's embeddings are matched to)."""
        return int(teacher.config.hidden_size)

    def embed(self, model: nn.Module, inputs: Mapping[str, Tensor]) -> Tensor:
        """``(n, width)`` embeddings: pooled last hidden states, L2-normalised when ``normalize``."""
        hidden = model(**inputs).last_hidden_state
        pooled = reduce_hidden(hidden, self.pooling, inputs.get("attention_mask"))
        return F.normalize(pooled.float(), dim=-1) if self.normalize else pooled

    def encode(self, model: nn.Module, batch: Mapping[str, Any]) -> ModelOutputs:
        """Queries and documents of ``batch`` through ``model``: the ``n x n`` score matrix as
        ``logits``, the embeddings as ``features['query']`` and ``features['document']``."""
        queries, documents = (self.embed(model, side_inputs(batch, side)) for side in SIDES)
        return ModelOutputs(logits=queries @ documents.T, features={"query": queries, "document": documents})

    def student_outputs(self, batch: Mapping[str, Any]) -> ModelOutputs:
        return self.encode(self.student, batch)

    @torch.no_grad()
    def teacher_outputs(self, batch: Mapping[str, Any]) -> ModelOutputs:
        return self.encode(self.teacher, batch)

    @torch.no_grad()
    def _probe_tap_widths(self) -> dict[str, int]:
        """The embedding widths of student and teacher, from one short input."""
        inputs = self.tokenizer(["width probe"], return_tensors="pt")
        inputs = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        was_training = self.student.training
        self.student.eval()
        widths = {
            STUDENT_WIDTH: self.embed(self.student, inputs).shape[-1],
            TEACHER_WIDTH: self.embed(self.teacher, inputs).shape[-1],
        }
        self.student.train(was_training)
        return widths

    # ---- evaluation: recall@k over the split's documents -------------------------------------------
    @staticmethod
    def update_recall(metrics: nn.Module, outputs: ModelOutputs, batch: Mapping[str, Any]) -> None:
        metrics.update(outputs.features["query"], outputs.features["document"], batch["query_id"], batch["document_id"])

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> ModelOutputs:
        student = self.student_outputs(batch)
        self.update_recall(self.val_metrics, student, batch)
        return student

    def test_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        self.update_recall(self.test_metrics, self.student_outputs(batch), batch)
        self.update_teacher_metrics(batch, self.teacher_test_metrics)

    @torch.no_grad()
    def update_teacher_metrics(self, batch: Mapping[str, Any], metrics: nn.Module) -> None:
        """Score the teacher (in eval mode) on ``batch`` into ``metrics``."""
        was_training = self.teacher.training
        self.teacher.eval()
        self.update_recall(metrics, self.teacher_outputs(batch), batch)
        self.teacher.train(was_training)

    def predict_step(self, batch: Mapping[str, Any], batch_idx: int) -> dict[str, Tensor]:
        """The student's ``query`` and ``document`` embeddings of the batch."""
        return dict(self.student_outputs(batch).features)


__all__ = ["EmbedDistillModule", "EmbeddingMatching", "InBatchContrastive", "ScoreDistillation", "load_encoder"]

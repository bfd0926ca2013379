"""``CausalLMDistillModule``: token-level distillation of a causal LM teacher into a causal LM student.

The :class:`~kd_lightning.DistillModule` step, on language models: teacher and student are
``AutoModelForCausalLM``; the logit losses of :mod:`kd_lightning.losses` (KD / forward KL,
reverse KL, JS, skew KL / RKL, TVD, BD-KD, ...) compare ``p_t(. | y_<i)`` and ``p_s(. | y_<i)``
over the vocabulary at every position ``i`` that predicts a response token (``labels[i + 1] !=
-100``: prompt and padding never count) and average over those positions,

    L = 1/|R| sum_{i in R} D(p_t(. | y_<=i) || p_s(. | y_<=i)),

computed ``chunk_size`` token rows at a time, forward and backward, when the loss sets one.
Feature and geometry losses read decoder hidden states through taps (e.g.
``model.layers.5``), reduced over the same positions (``mean``: one row per sequence;
``tokens``: one row per position). The student's own objective is
:class:`~kd_lightning.losses.NextTokenCrossEntropy`.

Validation logs ``val/nll`` and ``val/ppl`` of the response tokens (the teacher's as
``val/teacher/*`` once at fit start); generation quality (ROUGE-L) comes from
:class:`~kd_lightning.callbacks.GenerationEvaluator`.

With ``teacher_cache`` set, training steps read the teacher from a top-k cache of the training
split (:class:`~kd_lightning.teacher_cache.TopKTeacherCache`, built on first use or by
``python -m kd_lightning cache``): the ``top_k`` log-probabilities of every response position
and the remaining mass, from which the divergences rebuild each row chunk by chunk; taps are
cached as they are. Validation and test run the live teacher.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import Tensor
from transformers import PreTrainedModel

from kd_lightning.causal.models import build_causal_student, load_causal_lm, student_tokenizer
from kd_lightning.causal.vocabulary import shared_vocabulary_size
from kd_lightning.losses.base import DistillLoss
from kd_lightning.losses.functional import IGNORE_INDEX, next_token_targets, token_cross_entropy
from kd_lightning.losses.logits import CrossEntropy
from kd_lightning.metrics.language_modeling import language_model_metrics
from kd_lightning.models import StudentSpec, TeacherSpec
from kd_lightning.module import DistillModule
from kd_lightning.outputs import ModelOutputs
from kd_lightning.taps import FeatureTaps, TapSpec
from kd_lightning.teacher_cache import (
    CacheRefusedError,
    TeacherCacheConfig,
    TopKTeacherCache,
    cache_key,
    check_cacheable,
    check_topk_losses,
    open_or_build_folder,
    tokenization_settings,
    write_topk_cache,
)
from kd_lightning.teacher_pass import training_split
from kd_lightning.training import OptimConfig, model_inputs


def response_token_mask(labels: Tensor) -> Tensor:
    """``(batch, seq)``: true at the positions whose next token is a response token."""
    return next_token_targets(labels) != IGNORE_INDEX


class CausalLMDistillModule(DistillModule):
    """Distillation of a causal LM into a smaller one, on response tokens (see the module docstring).

    Args:
        teacher: the teacher LM (``name_or_path``: hub name, local folder, or packaged key
            ``SmolLM2-135M-Instruct``).
        student: its first or chosen layers (``from_teacher_layers``), a checkpoint
            (``name_or_path``), or a config override (random init).
        losses: e.g. ``NextTokenCrossEntropy`` and ``KLDivergence`` with ``chunk_size``.
        taps, optim, save_teacher, nonfinite: as for :class:`~kd_lightning.DistillModule`.
        truncate_vocab: when the output layers differ in size over the same tokenizer (padded
            vocabularies), compare the first ``min(V_t, V_s)`` logits; otherwise such models
            are refused at start-up.
        eval_chunk_size: token rows per chunk of the validation loss and metrics.
        teacher_cache: read the teacher on the training split from a top-k cache (``top_k``
            log-probabilities per response token and the remaining mass, see
            :mod:`kd_lightning.teacher_cache`) instead of running it each step. Only losses that
            can run on the reconstructed rows are allowed (row-wise divergences, feature losses,
            student-only losses); give them a ``chunk_size``.
    """

    def __init__(
        self,
        teacher: TeacherSpec,
        student: StudentSpec,
        losses: list[DistillLoss],
        taps: dict[str, TapSpec] | None = None,
        optim: OptimConfig | None = None,
        save_teacher: bool = False,
        truncate_vocab: bool = False,
        eval_chunk_size: int | None = 1024,
        nonfinite: Literal["raise", "skip"] = "raise",
        teacher_cache: TeacherCacheConfig | None = None,
    ) -> None:
        for loss in losses:
            if type(loss) is CrossEntropy:
                raise ValueError(
                    f"loss {loss.name!r}: CrossEntropy compares each position's logits with the label at the same "
                    "position; a causal LM predicts the next token: use kd_lightning.losses.NextTokenCrossEntropy"
                )
        if teacher_cache is not None:
            check_topk_losses(losses)
        # Read by build_student_model and shared_outputs during DistillModule.__init__.
        self.truncate_vocab = bool(truncate_vocab)
        self.eval_chunk_size = eval_chunk_size
        super().__init__(
            teacher, student, losses, taps=taps, optim=optim, save_teacher=save_teacher,
            teacher_cache=teacher_cache, nonfinite=nonfinite,
        )  # fmt: skip
        metrics = language_model_metrics(eval_chunk_size)
        for name in self.task_metric_collections:
            setattr(self, name, metrics.clone(prefix=getattr(self, name).prefix))

    # ---- models ----------------------------------------------------------------------------------
    def load_teacher(self, spec: TeacherSpec) -> PreTrainedModel:
        return load_causal_lm(spec.name_or_path)

    def build_student_model(self, spec: StudentSpec, teacher: PreTrainedModel) -> PreTrainedModel:
        """The student LM, checked to share the teacher's tokenizer."""
        model = build_causal_student(spec, teacher)
        own_tokenizer = student_tokenizer(spec, self.tokenizer)
        shared_vocabulary_size(
            teacher, model, self.tokenizer, own_tokenizer, self.truncate_vocab,
            teacher_name=str(teacher.config.name_or_path), student_name=spec.name_or_path or "built from the teacher",
        )  # fmt: skip
        return model

    def shared_outputs(self, teacher: PreTrainedModel, student: PreTrainedModel) -> int:
        """The vocabulary size both models' logits are compared over (``num_labels`` here)."""
        return shared_vocabulary_size(teacher, student, self.tokenizer, self.tokenizer, self.truncate_vocab)

    # ---- forward passes ------------------------------------------------------------------------
    def vocabulary_logits(self, logits: Tensor) -> Tensor:
        """The first ``num_labels`` logits (a view: nothing is copied) when the output layer is larger."""
        return logits if logits.shape[-1] == self.num_labels else logits[..., : self.num_labels]

    def _outputs(self, model: PreTrainedModel, taps: FeatureTaps, batch: Mapping[str, Any]) -> ModelOutputs:
        taps.clear()
        logits = self.vocabulary_logits(model(**model_inputs(batch), use_cache=False).logits)
        mask = response_token_mask(batch["labels"])
        return ModelOutputs(
            logits=logits, features=taps.collect(mask), attention_mask=batch.get("attention_mask"), token_mask=mask
        )

    def student_outputs(self, batch: Mapping[str, Any]) -> ModelOutputs:
        return self._outputs(self.student, self.student_taps, batch)

    def teacher_outputs(self, batch: Mapping[str, Any]) -> ModelOutputs:
        """The live teacher's outputs; in training with a teacher cache, the cached ones (the
        logits then a :class:`~kd_lightning.topk_logprobs.TopKLogProbs` over the response tokens)."""
        if self.teacher_cache is not None and self.training:
            mask = response_token_mask(batch["labels"])
            cached = self.teacher_cache.read(batch["index"], self.device, token_mask=mask)
            cached.attention_mask = batch.get("attention_mask")
            return cached
        with torch.no_grad():
            return self._outputs(self.teacher, self.teacher_taps, batch)

    # ---- teacher cache ---------------------------------------------------------------------------
    def open_teacher_cache(self, datamodule: Any) -> TopKTeacherCache:
        """The top-k cache of the teacher on ``datamodule``'s training split, built if missing: one
        pass of the live teacher step (:meth:`teacher_outputs`) with a progress bar."""
        from kd_lightning.causal.speculative import SpeculativeKDModule
        from kd_lightning.models import parameter_fingerprint

        if self.teacher_is_trainable():
            raise ValueError(
                f"{type(self).__name__} trains its teacher: its outputs cannot be cached; remove teacher_cache"
            )
        if isinstance(self, SpeculativeKDModule):
            raise CacheRefusedError(
                f"{type(self).__name__} trains on responses it samples during training, which no cache of the data's "
                "responses holds; remove teacher_cache (or train with CausalLMDistillModule)"
            )
        check_cacheable(datamodule)
        check_topk_losses(self.losses)
        dataset, collate = training_split(datamodule)
        config = self.teacher_cache_config or TeacherCacheConfig()
        top_k = min(config.top_k, self.num_labels)
        settings = {
            "layout": "topk",
            "top_k": top_k,
            "vocab_size": self.num_labels,
            "tokenization": tokenization_settings(datamodule),
        }
        key = cache_key(
            dataset._fingerprint, parameter_fingerprint(self.teacher), self.tap_specs, config.dtype, settings
        )
        batch_size = config.batch_size or getattr(datamodule, "eval_batch_size", None) or 8
        self.teacher.to(self.device)

        def live(batch: Mapping[str, Any]) -> ModelOutputs:
            return self._outputs(self.teacher, self.teacher_taps, batch)

        def write(folder: Any) -> None:
            write_topk_cache(
                folder, live, self.teacher, self.tap_specs, dataset, collate, top_k, self.num_labels, config.dtype,
                batch_size, key,
            )  # fmt: skip

        try:
            cache = open_or_build_folder(TopKTeacherCache, key, config, write)
        finally:
            self.teacher_taps.clear()
        return cache

    # ---- evaluation ------------------------------------------------------------------------------
    def supervised_loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Next-token cross-entropy on the response tokens (the logged ``val/loss``)."""
        return token_cross_entropy(logits, next_token_targets(labels), chunk_size=self.eval_chunk_size)

    def predictions(self, logits: Tensor) -> Tensor:
        """The metrics take the logits themselves (with the labels)."""
        return logits

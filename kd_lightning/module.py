"""``DistillModule``: a frozen teacher, a trainable student, taps and a sum of losses."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from kd_lightning.cuda_graphs import CudaGraphConfig, GraphedForward
from kd_lightning.losses.base import DistillLoss
from kd_lightning.models import (
    StudentSpec,
    TeacherSpec,
    build_student,
    check_shared_vocabulary,
    freeze,
    load_classifier,
    load_tokenizer,
)
from kd_lightning.outputs import ModelOutputs
from kd_lightning.suggestions import did_you_mean
from kd_lightning.taps import FeatureTaps, TapSpec
from kd_lightning.teacher_cache import TeacherCache, TeacherCacheConfig, cache_key, check_cacheable
from kd_lightning.teacher_pass import training_split
from kd_lightning.training import OptimConfig, StudentModule, default_task_metrics, model_inputs


class NonFiniteLossError(FloatingPointError):
    """A loss term (or the weighted total) was NaN or infinite in a training step."""


class DistillModule(StudentModule):
    """Knowledge distillation of a frozen teacher into a student, one training step at a time.

    Each step runs the teacher under ``no_grad`` (only when a loss needs it) and the student,
    collects the tapped features of both, and minimises ``sum_i w_i * loss_i(student, teacher,
    batch)``. Every term is logged on its own as ``train/loss/<name>`` beside ``train/loss`` (the
    terms and weights on the steps the loggers write, ``train/loss`` at every step).

    The teacher is frozen for the whole run: no gradients, always in eval mode (Lightning's
    ``train()`` does not reach it), outside the optimiser, invisible to DDP (it is not a
    registered submodule) and not in the checkpoint unless ``save_teacher`` is set. Subclasses
    that train the teacher (online methods) override :meth:`teacher_is_trainable`.

    Args:
        teacher: where the teacher comes from (``name_or_path``, ``num_labels``).
        student: how the student is built (a checkpoint, chosen teacher layers, or a config
            override).
        losses: the terms of the objective, each with its weight.
        taps: tap name -> where it sits (``teacher``/``student``, dotted path) and its reduction.
        optim: optimiser and learning-rate schedule.
        save_teacher: also store the teacher's weights in checkpoints.
        teacher_cache: read the teacher's outputs on the training split from an on-disk cache
            (built on first use) instead of running the teacher each step; validation and
            test still run the live teacher.
        teacher_cuda_graphs: on a GPU, replay the frozen teacher's training forward pass from
            CUDA graphs, one per input shape (:mod:`kd_lightning.cuda_graphs`): the same
            outputs to rounding, at a fraction of the host time of the eager pass, which is
            what bounds a small teacher's step. Not with ``teacher_cache``, a trained teacher,
            FSDP or a CPU run.
        nonfinite: what a NaN or infinite loss term does: ``raise`` stops the run with
            :class:`NonFiniteLossError` naming the term, the global step and the batch's
            example indices; ``skip`` drops that step (no optimiser update), warns, and counts
            it in ``train/skipped_nonfinite``. Under DDP every process takes the same decision.
    """

    task_metric_collections = (*StudentModule.task_metric_collections, "teacher_val_metrics", "teacher_test_metrics")

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
        teacher_cuda_graphs: CudaGraphConfig | None = None,
    ) -> None:
        super().__init__(optim)
        if nonfinite not in ("raise", "skip"):
            raise ValueError(f"nonfinite must be 'raise' or 'skip', got {nonfinite!r}")
        if teacher_cache is not None and teacher_cuda_graphs is not None:
            raise ValueError(
                "teacher_cache and teacher_cuda_graphs both replace the live teacher's training forward pass: "
                "keep one (the cache runs no teacher at all; graphs replay it on a GPU)"
            )
        self.save_hyperparameters(ignore=["losses"])
        if not losses:
            raise ValueError("DistillModule needs at least one loss, e.g. kd_lightning.losses.KLDivergence")
        taps = dict(taps or {})
        self._check_losses(losses, taps)

        teacher_model = self.load_teacher(teacher)
        self.tokenizer = load_tokenizer(teacher.name_or_path)
        self.student = self.build_student_model(student, teacher_model)
        check_shared_vocabulary(self.tokenizer, self.student, student.name_or_path)
        self.num_labels = self.shared_outputs(teacher_model, self.student)
        if not self.teacher_is_trainable():
            freeze(teacher_model)
        # Stored outside nn.Module registration: DDP, the optimiser, train() and the checkpoint never see it.
        object.__setattr__(self, "_teacher", teacher_model)
        self.save_teacher = save_teacher
        self.teacher_cache_config = teacher_cache
        self.teacher_cache: TeacherCache | None = None
        self.teacher_cuda_graphs = teacher_cuda_graphs
        self.teacher_graphs: GraphedForward | None = None

        self.tap_specs = taps
        self.teacher_taps = FeatureTaps(teacher_model, taps, "teacher")
        self.student_taps = FeatureTaps(self.student, taps, "student")
        self.losses = nn.ModuleList(losses)
        self.needs_teacher = any(loss.needs_teacher for loss in losses)
        widths = self._probe_tap_widths()
        for loss in losses:
            loss.build(widths, self.num_labels)
        self._init_metrics()
        self.teacher_val_metrics = default_task_metrics(self.num_labels).clone(prefix="val/teacher/")
        self.teacher_test_metrics = default_task_metrics(self.num_labels).clone(prefix="test/teacher/")
        self.teacher_metrics: dict[str, float] = {}
        self.nonfinite = nonfinite
        self.skipped_nonfinite = 0
        self._drop_gradients = False

    @property
    def teacher(self) -> nn.Module:
        return self._teacher

    # ---- the two models (causal-LM distillation loads language models instead) -------------------
    def load_teacher(self, spec: TeacherSpec) -> PreTrainedModel:
        """The teacher model: a sequence classifier with ``spec.num_labels`` classes."""
        return load_classifier(spec.name_or_path, spec.num_labels)

    def build_student_model(self, spec: StudentSpec, teacher: PreTrainedModel) -> PreTrainedModel:
        """The student model described by ``spec``, with the teacher's classes."""
        return build_student(spec, teacher, int(teacher.config.num_labels))

    def shared_outputs(self, teacher: PreTrainedModel, student: PreTrainedModel) -> int:
        """The number of outputs (classes) teacher and student share: ``num_labels``."""
        num_labels = int(teacher.config.num_labels)
        if student.config.num_labels != num_labels:
            raise ValueError(
                f"teacher and student have different label counts: teacher {num_labels}, "
                f"student {student.config.num_labels}. Give the student a head with {num_labels} labels."
            )
        return num_labels

    def teacher_is_trainable(self) -> bool:
        """Whether the teacher trains too. ``False`` here; online methods return ``True``."""
        return False

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit" and self.teacher_cache_config is not None and self.needs_teacher:
            self.teacher_cache = self.open_teacher_cache(self.trainer.datamodule)
        if stage == "fit" and self.teacher_cuda_graphs is not None and self.needs_teacher:
            self.teacher_graphs = self.make_teacher_graphs(self.trainer.strategy.root_device)

    def make_teacher_graphs(self, device: torch.device) -> GraphedForward:
        """The teacher's training forward pass (logits and raw tap captures) as CUDA graphs on ``device``."""
        from kd_lightning.strategies import DistillFSDPStrategy

        if self.teacher_is_trainable():
            raise ValueError(
                f"{type(self).__name__} trains its teacher: a CUDA graph replays a frozen forward pass; remove teacher_cuda_graphs"
            )
        if torch.device(device).type != "cuda":
            raise ValueError(
                f"teacher_cuda_graphs needs a CUDA device, and this run is on {device}: "
                "remove teacher_cuda_graphs, or train on a GPU (trainer.accelerator: gpu)"
            )
        if self._trainer is not None and isinstance(self.trainer.strategy, DistillFSDPStrategy):
            raise ValueError(
                "teacher_cuda_graphs cannot replay an FSDP-sharded teacher (its forward pass gathers parameters "
                "across GPUs): remove teacher_cuda_graphs, or use the ddp strategy"
            )
        return GraphedForward(self._teacher_forward, self.teacher_cuda_graphs, name="teacher forward pass")

    def _teacher_forward(self, inputs: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """The frozen teacher's logits and raw tap captures: what the CUDA graphs record."""
        with torch.no_grad():
            self.teacher_taps.clear()
            logits = self.teacher(**inputs).logits
            return logits, self.teacher_taps.take()

    def open_teacher_cache(self, datamodule: Any) -> TeacherCache:
        """The cache of the teacher's outputs on ``datamodule``'s training split, built if missing."""
        from kd_lightning.models import parameter_fingerprint

        if self.teacher_is_trainable():
            raise ValueError(f"{type(self).__name__} trains its teacher: its outputs cannot be cached; remove teacher_cache")
        check_cacheable(datamodule)
        dataset, collate = training_split(datamodule)
        config = self.teacher_cache_config or TeacherCacheConfig()
        key = cache_key(dataset._fingerprint, parameter_fingerprint(self.teacher), self.tap_specs, config.dtype)
        self.teacher.to(self.device)
        cache = TeacherCache.open_or_build(self.teacher, self.tap_specs, dataset, collate, key, config)
        self.teacher_taps.clear()
        return cache

    # ---- set-up checks ------------------------------------------------------------------------
    @staticmethod
    def _check_losses(losses: list[DistillLoss], taps: Mapping[str, TapSpec]) -> None:
        names = [loss.name for loss in losses]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"losses share the name(s) {repeated}: give each a distinct `name` in its init_args")
        for name, spec in taps.items():
            if spec.module not in ("teacher", "student"):
                raise ValueError(
                    f"tap {name!r} sits on module {spec.module!r}{did_you_mean(spec.module, ('teacher', 'student'))}: "
                    "set its module to 'teacher' or 'student'"
                )
        for loss in losses:
            missing = [t for t in loss.required_taps if t not in taps]
            if missing:
                declared = ", ".join(sorted(taps)) or "none"
                hints = "".join(did_you_mean(t, taps) for t in missing)
                raise ValueError(
                    f"loss {loss.name!r} needs tap(s) {missing} that no tap declares{hints} (declared: {declared}). "
                    "Add them under model.init_args.taps with module, path and reduce."
                )
            for side in ("student", "teacher"):
                tap = getattr(loss, f"{side}_tap", None)
                if tap in taps and taps[tap].module != side:
                    raise ValueError(
                        f"loss {loss.name!r} reads tap {tap!r} as its {side} tap, but {tap!r} sits on the "
                        f"{taps[tap].module}: swap the loss's student and teacher init_args, or declare {tap!r} "
                        f"with module: {side}"
                    )

    @torch.no_grad()
    def _probe_tap_widths(self) -> dict[str, int]:
        """Run both models once on a two-token input to learn the width of every tap."""
        if not self.tap_specs:
            return {}
        inputs = self.tokenizer(["width probe"], return_tensors="pt")
        inputs = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        was_training = self.student.training
        self.student.eval()
        widths = {}
        for model, taps in ((self.teacher, self.teacher_taps), (self.student, self.student_taps)):
            if len(taps):
                taps.clear()
                model(**inputs)
                widths.update({n: f.shape[-1] for n, f in taps.collect(inputs["attention_mask"]).items()})
        self.student.train(was_training)
        return widths

    # ---- device / mode handling of the unregistered teacher ---------------------------------
    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> DistillModule:
        super()._apply(fn, *args, **kwargs)
        self._teacher._apply(fn, *args, **kwargs)
        if getattr(self, "teacher_graphs", None) is not None:
            self.teacher_graphs.reset()  # the graphs hold the old parameters' addresses
        return self

    def train(self, mode: bool = True) -> DistillModule:
        super().train(mode)
        self._teacher.train(mode and self.teacher_is_trainable())
        return self

    def trainable_modules(self) -> Iterator[nn.Module]:
        yield self.student
        yield self.losses

    # ---- forward passes ------------------------------------------------------------------------
    def student_outputs(self, batch: Mapping[str, Any]) -> ModelOutputs:
        self.student_taps.clear()
        logits = self.student(**model_inputs(batch)).logits
        mask = batch.get("attention_mask")
        return ModelOutputs(logits=logits, features=self.student_taps.collect(mask), attention_mask=mask)

    def teacher_outputs(self, batch: Mapping[str, Any]) -> ModelOutputs:
        if self.teacher_cache is not None and self.training:
            cached = self.teacher_cache.read(batch["index"], self.device)
            cached.attention_mask = batch.get("attention_mask")
            return cached
        mask = batch.get("attention_mask")
        if self.teacher_graphs is not None and self.training:
            logits, captures = self.teacher_graphs(model_inputs(batch))
            return ModelOutputs(logits=logits, features=self.teacher_taps.reduce(captures, mask), attention_mask=mask)
        grad = torch.enable_grad() if self.teacher_is_trainable() else torch.no_grad()
        with grad:
            self.teacher_taps.clear()
            logits = self.teacher(**model_inputs(batch)).logits
            return ModelOutputs(logits=logits, features=self.teacher_taps.collect(mask), attention_mask=mask)

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> ModelOutputs:
        """Student metrics; returns the student's outputs with their taps, so callbacks
        (alignment metrics) need not run the student again."""
        student = self.student_outputs(batch)
        self._evaluate(batch, self.val_metrics, "val", logits=self.class_logits(student.logits))
        return student

    def loss_terms(
        self, student: ModelOutputs, teacher: ModelOutputs | None, batch: Mapping[str, Any]
    ) -> dict[str, Tensor]:
        """Unweighted value of every loss, computed in float32 outside autocast."""
        device_type = student.logits.device.type
        autocast_off = torch.autocast(device_type, enabled=False) if device_type in ("cpu", "cuda") else contextlib.nullcontext()
        with autocast_off:
            return {loss.name: loss(student, teacher, batch) for loss in self.losses}

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor | None:
        teacher = self.teacher_outputs(batch) if self.needs_teacher else None
        student = self.student_outputs(batch)
        terms = self.loss_terms(student, teacher, batch)
        total = sum(loss.weight * terms[loss.name] for loss in self.losses)
        batch_size = student.logits.shape[0]
        return self.checked_total(terms, total, batch, batch_size)

    def checked_total(self, terms: Mapping[str, Tensor], total: Tensor, batch: Mapping[str, Any], batch_size: int) -> Tensor | None:
        """Log every term (``train/loss/<name>``) and the weights of this module's losses on the
        steps the loggers write (:meth:`logger_step`), ``train/loss`` at every step, and return
        ``total``; or handle a non-finite term as ``nonfinite`` says. ``terms`` may hold terms
        beyond :attr:`losses` (a subclass's extra objectives); each is checked and logged."""
        nonfinite = self._nonfinite_terms(terms, total)
        if nonfinite:
            return self._nonfinite_step(nonfinite, {**terms, "total": total}, batch, batch_size)
        if self.logger_step():
            for name, value in terms.items():
                self.log(f"train/loss/{name}", value.detach(), batch_size=batch_size)
            for loss in self.losses:
                self.log(f"train/weight/{loss.name}", loss.weight, batch_size=batch_size)
            if self.nonfinite == "skip":
                self.log("train/skipped_nonfinite", float(self.skipped_nonfinite), batch_size=batch_size)
        self.log("train/loss", total.detach(), prog_bar=True, batch_size=batch_size)
        return total

    # ---- non-finite losses -----------------------------------------------------------------------
    def _nonfinite_terms(self, terms: Mapping[str, Tensor], total: Tensor) -> list[str]:
        """The names of the terms that are NaN or infinite on any process (``total`` when only
        the weighted sum is, e.g. an infinite weight). One host sync per step; under DDP one
        all-reduce of a flag per term, so that every process skips or stops together."""
        names = [*terms, "total"]
        flags = torch.stack([~torch.isfinite(value.detach()).all() for value in (*terms.values(), total)]).float()
        if self._trainer is not None and self.trainer.world_size > 1:
            flags = self.trainer.strategy.reduce(flags, reduce_op="sum")
        bad = [name for name, flag in zip(names, flags.tolist(), strict=True) if flag > 0]
        return [name for name in bad if name != "total"] or bad

    def _nonfinite_step(
        self, names: list[str], values: Mapping[str, Tensor], batch: Mapping[str, Any], batch_size: int
    ) -> Tensor | None:
        """Raise, or skip the optimiser step: ``None`` on one process (Lightning then skips
        backward and the update); under DDP, which needs a backward on every process, a zero
        loss over the trainable parameters whose gradients :meth:`on_before_optimizer_step`
        then drops (with gradient accumulation the whole accumulated step is dropped)."""
        shown = ", ".join(f"{name}={float(values[name].detach().float().mean())}" for name in names)
        index = batch.get("index")
        examples = index.tolist() if isinstance(index, Tensor) else "unknown (the batch has no 'index' field)"
        where = f" (process {self.global_rank})" if self._trainer is not None and self.trainer.world_size > 1 else ""
        message = (
            f"non-finite loss term(s) {names} at global step {self.global_step}{where}: {shown}; "
            f"batch examples (batch['index']): {examples}"
        )
        if self.nonfinite == "raise":
            raise NonFiniteLossError(
                f"{message}. Set model.init_args.nonfinite: skip to skip such steps, or look at these examples, "
                "the learning rate and the loss settings."
            )
        self.skipped_nonfinite += 1
        warnings.warn(f"{message}; step skipped ({self.skipped_nonfinite} so far)", RuntimeWarning, stacklevel=2)
        self.log("train/skipped_nonfinite", float(self.skipped_nonfinite), batch_size=batch_size)
        if self._trainer is None or self.trainer.world_size == 1:
            return None
        self._drop_gradients = True
        return sum(p.sum() for p in self.parameters() if p.requires_grad) * 0.0

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Drop the gradients of a step skipped under DDP, so the optimiser leaves every
        parameter (and its moments) untouched, as on one process."""
        if self._drop_gradients:
            self._drop_gradients = False
            for group in optimizer.param_groups:
                for param in group["params"]:
                    param.grad = None

    # ---- teacher reference metrics -------------------------------------------------------------
    def on_fit_start(self) -> None:
        """Measure the teacher once on the validation data, so the gap is visible from step 0."""
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "val_dataloader"):
            return
        metrics = self.teacher_val_metrics
        metrics.reset()
        for batch in datamodule.val_dataloader():
            self.update_teacher_metrics(self.transfer_batch_to_device(batch, self.device, 0), metrics)
        self.teacher_metrics = {k: float(v) for k, v in metrics.compute().items()}
        metrics.reset()
        for logger in self.loggers:
            logger.log_metrics(self.teacher_metrics, step=self.global_step)

    @torch.no_grad()
    def update_teacher_metrics(self, batch: Mapping[str, Any], metrics: nn.Module) -> None:
        """Score the teacher (in eval mode) on ``batch`` into ``metrics``."""
        was_training = self.teacher.training
        self.teacher.eval()
        logits = self.teacher(**model_inputs(batch)).logits
        self.teacher_taps.clear()  # evaluation reads no features; release what the hooks captured
        self.teacher.train(was_training)
        metrics.update(self.predictions(logits), batch["labels"])

    def test_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        super().test_step(batch, batch_idx)
        self.update_teacher_metrics(batch, self.teacher_test_metrics)

    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()
        self.log_dict(self.teacher_test_metrics.compute())
        self.teacher_test_metrics.reset()

    # ---- checkpoints ----------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["skipped_nonfinite"] = self.skipped_nonfinite
        if self.save_teacher:
            checkpoint["teacher_state_dict"] = self.teacher.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.skipped_nonfinite = int(checkpoint.get("skipped_nonfinite", 0))
        if "teacher_state_dict" in checkpoint:
            self.teacher.load_state_dict(checkpoint["teacher_state_dict"])

"""``ValidationDiagnostics``: at every validation, a layer-by-layer CKA heatmap of teacher and
student and their reliability diagrams, as TensorBoard images."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from kd_lightning.callbacks.validation_batches import ValidationBatchReader
from kd_lightning.metrics import CrossLayerCKA, ReliabilityBins, ReliabilityCurve
from kd_lightning.models import find_layer_stack
from kd_lightning.taps import FeatureTaps, TapSpec, resolve_submodule


def layer_paths(model: nn.Module) -> list[str]:
    """The dotted paths of every block of ``model``'s transformer layer stack."""
    name, stack = find_layer_stack(model)
    return [f"{name}.{i}" for i in range(len(stack))]


class ValidationDiagnostics(ValidationBatchReader):
    """Draws, at the end of every validation, what the scalars cannot show:

    - ``val/layer_cka``: linear CKA (Kornblith et al., 2019) between every teacher layer (rows)
      and every student layer (columns) over the whole validation set — which teacher layer each
      student layer resembles. Streaming (:class:`~kd_lightning.metrics.CrossLayerCKA`): the
      values are those of the full set, whatever the batching.
    - ``val/reliability``: confidence bins against accuracy for the student and the teacher,
      each titled with its ECE (the bins of the logged ``val/ece``).

    Images go to every logger with a TensorBoard ``SummaryWriter`` (``add_image``). The student's
    layers and logits are captured by hooks from the validation step's own forward pass; the
    teacher runs once more per validation batch, under ``no_grad``. Hooks exist only during
    validation epochs; the sanity check draws nothing. The last values stay readable as
    :attr:`layer_cka` (a ``(teacher layers, student layers)`` tensor) and :attr:`curves`.

    Modules without a teacher (``FineTuneModule``) get the student's reliability diagram only;
    regression tasks (one output) and token-level logits get the CKA heatmap only.

    Args:
        teacher_layers: dotted paths of the teacher layers to compare (``python -m kd_lightning
            modules MODEL`` lists them); default: every block of its layer stack
            (``bert.encoder.layer.*``, ``model.layers.*``, ...).
        student_layers: the same for the student.
        reduce: how each layer's output becomes rows: ``mean`` over real tokens (default),
            ``cls`` (first position) or ``tokens`` (every real token a row; costlier).
        n_bins: confidence bins of the reliability diagram.
        layer_cka / reliability: draw the heatmap / the reliability diagram.
    """

    def __init__(
        self,
        teacher_layers: Sequence[str] | None = None,
        student_layers: Sequence[str] | None = None,
        reduce: Literal["mean", "cls", "tokens"] = "mean",
        n_bins: int = 15,
        layer_cka: bool = True,
        reliability: bool = True,
    ) -> None:
        if reduce not in ("mean", "cls", "tokens"):
            raise ValueError(f"ValidationDiagnostics reduce must be 'mean', 'cls' or 'tokens', got {reduce!r}")
        self.teacher_paths = list(teacher_layers or [])
        self.student_paths = list(student_layers or [])
        self.reduce = reduce
        self.n_bins = n_bins
        self.draw_cka = layer_cka
        self.draw_reliability = reliability
        self.has_teacher = self.cka_on = self.reliability_on = False  # decided in setup, from the module
        self.cka_metric: CrossLayerCKA | None = None
        self.reliability_metrics: dict[str, ReliabilityBins] = {}
        self.layer_cka: Tensor | None = None
        self.curves: dict[str, ReliabilityCurve] = {}
        self._taps: dict[str, FeatureTaps] = {}
        self._logits_hook: RemovableHandle | None = None
        self._student_logits: Tensor | None = None

    # ---- set-up ------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        teacher = getattr(pl_module, "teacher", None)
        self.has_teacher = isinstance(teacher, nn.Module)
        self.cka_on = self.draw_cka and self.has_teacher
        self.reliability_on = self.draw_reliability and not getattr(pl_module, "is_regression", False)
        if self.cka_on:
            self.student_paths = self.student_paths or layer_paths(pl_module.student)
            self.teacher_paths = self.teacher_paths or layer_paths(teacher)
            for path in self.student_paths:
                resolve_submodule(pl_module.student, path, "student")
            for path in self.teacher_paths:
                resolve_submodule(teacher, path, "teacher")

    def _attach(self, pl_module: pl.LightningModule) -> None:
        if self.cka_on:
            for owner, model, paths in (
                ("student", pl_module.student, self.student_paths),
                ("teacher", pl_module.teacher, self.teacher_paths),
            ):
                specs = {str(i): TapSpec(owner, path, self.reduce) for i, path in enumerate(paths)}
                self._taps[owner] = FeatureTaps(model, specs, owner)
        if self.reliability_on:
            self._logits_hook = pl_module.student.register_forward_hook(self._capture_logits)

    def _capture_logits(self, module: nn.Module, args: Any, output: Any) -> None:
        self._student_logits = output.logits

    def _detach(self) -> None:
        for taps in self._taps.values():
            taps.remove()
        self._taps.clear()
        if self._logits_hook is not None:
            self._logits_hook.remove()
            self._logits_hook = None
        self._student_logits = None

    # ---- one validation epoch ----------------------------------------------------------------
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        for metric in (self.cka_metric, *self.reliability_metrics.values()):
            if metric is not None:
                metric.reset()
        self._attach(pl_module)

    def read_validation_batch(self, pl_module: pl.LightningModule, outputs: Any, batch: Any) -> None:
        mask = batch.get("attention_mask")
        student_layers = self._layers("student", mask)
        student_logits, self._student_logits = self._student_logits, None
        runs_teacher = self.has_teacher and (self.cka_on or self.reliability_on)
        teacher_logits = pl_module.teacher_outputs(batch).logits if runs_teacher else None
        if self.cka_on:
            self._update_cka(student_layers, self._layers("teacher", mask))
        if self.reliability_on and student_logits is not None and student_logits.dim() == 2:  # classes, not tokens
            labels = batch["labels"]
            self._update_reliability("student", pl_module.predictions(pl_module.class_logits(student_logits)), labels)
            if teacher_logits is not None:
                self._update_reliability("teacher", pl_module.predictions(teacher_logits), labels)

    def _layers(self, owner: str, mask: Tensor | None) -> list[Tensor]:
        taps = self._taps.get(owner)
        return list(taps.collect(mask).values()) if taps is not None else []

    def _update_cka(self, student: list[Tensor], teacher: list[Tensor]) -> None:
        if self.cka_metric is None:
            for owner, layers, paths in (("student", student, self.student_paths), ("teacher", teacher, self.teacher_paths)):
                widths = {path: layer.shape[-1] for path, layer in zip(paths, layers, strict=True)}
                if len(set(widths.values())) > 1:
                    raise ValueError(f"ValidationDiagnostics compares {owner} layers of one width; got widths {widths}")
            self.cka_metric = CrossLayerCKA(len(student), student[0].shape[-1], len(teacher), teacher[0].shape[-1])
            self.cka_metric.to(student[0].device)
        self.cka_metric.update(student, teacher)

    def _update_reliability(self, name: str, probabilities: Tensor, labels: Tensor) -> None:
        if name not in self.reliability_metrics:
            self.reliability_metrics[name] = ReliabilityBins(self.n_bins).to(probabilities.device)
        self.reliability_metrics[name].update(probabilities, labels)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._detach()
        # compute() syncs across processes: every process calls it, one draws.
        self.layer_cka = self.cka_metric.compute().cpu() if self.cka_metric is not None else None
        self.curves = {name: metric.compute() for name, metric in self.reliability_metrics.items()}
        self._draw(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._detach()

    @rank_zero_only
    def _draw(self, trainer: pl.Trainer) -> None:
        from kd_lightning.plots import cka_heatmap, figure_to_image, reliability_diagram

        writers = [lg.experiment for lg in trainer.loggers if hasattr(getattr(lg, "experiment", None), "add_image")]
        if not writers:
            return
        images = {}
        if self.layer_cka is not None:
            figure = cka_heatmap(self.layer_cka, self.teacher_paths, self.student_paths, f"linear CKA, {self.reduce} rows")
            images["val/layer_cka"] = figure_to_image(figure)
        if self.curves:
            images["val/reliability"] = figure_to_image(reliability_diagram(self.curves))
        # the step Lightning's logger connector gives the metrics logged now, so that each image
        # sits at the step of the validation scalars it goes with
        step = getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", trainer.global_step)
        for writer in writers:
            for tag, image in images.items():
                writer.add_image(tag, image, global_step=step, dataformats="CHW")

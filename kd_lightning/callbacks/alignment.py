"""Log the representational alignment of chosen student/teacher taps on the validation set."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl

from kd_lightning.callbacks.validation_batches import ValidationBatchReader
from kd_lightning.metrics.alignment import StreamingLinearCKA, StreamingProcrustes
from kd_lightning.outputs import ModelOutputs


class AlignmentLogger(ValidationBatchReader):
    """Linear CKA and Procrustes distance between tap pairs, over each whole validation run.

    Logs ``val/align/<name>/cka`` and ``val/align/<name>/procrustes`` (``2 - 2 ||T^T S||_*``
    on normalised rows) at the end of every validation epoch. The taps are the
    ``DistillModule``'s own (declare them under ``model.init_args.taps``); the statistics stream
    (:class:`~kd_lightning.metrics.StreamingLinearCKA`), so ``tokens`` reductions over a large
    validation set cost no extra memory. Each validation batch runs the teacher once more
    under ``no_grad``, and the student too unless ``validation_step`` returned its
    ``ModelOutputs``.

    Args:
        pairs: name -> ``[student_tap, teacher_tap]``, e.g. ``{last: [s_last, t_last]}``.
    """

    def __init__(self, pairs: Mapping[str, Sequence[str]]) -> None:
        bad = {name: pair for name, pair in pairs.items() if len(pair) != 2}
        if bad:
            raise ValueError(f"AlignmentLogger pairs must be [student_tap, teacher_tap]; got {bad}")
        self.pairs = {name: (str(pair[0]), str(pair[1])) for name, pair in pairs.items()}
        self.metrics: dict[str, tuple[StreamingLinearCKA, StreamingProcrustes]] = {}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        specs = getattr(pl_module, "tap_specs", None)
        if specs is None:
            raise TypeError("AlignmentLogger needs a DistillModule (a module with taps)")
        for name, (student_tap, teacher_tap) in self.pairs.items():
            for tap, owner in ((student_tap, "student"), (teacher_tap, "teacher")):
                if tap not in specs or specs[tap].module != owner:
                    declared = ", ".join(n for n, s in specs.items() if s.module == owner) or "none"
                    raise ValueError(
                        f"AlignmentLogger pair {name!r}: {tap!r} is not a {owner} tap of the module "
                        f"(declared {owner} taps: {declared})"
                    )

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for metrics in self.metrics.values():
            for metric in metrics:
                metric.reset()

    def read_validation_batch(self, pl_module: pl.LightningModule, outputs: Any, batch: Any) -> None:
        student = outputs if isinstance(outputs, ModelOutputs) else pl_module.student_outputs(batch)
        teacher = pl_module.teacher_outputs(batch)
        for name, (student_tap, teacher_tap) in self.pairs.items():
            s, t = student.features[student_tap], teacher.features[teacher_tap]
            if name not in self.metrics:
                self.metrics[name] = (
                    StreamingLinearCKA(s.shape[-1], t.shape[-1]).to(s.device),
                    StreamingProcrustes(s.shape[-1], t.shape[-1]).to(s.device),
                )
            for metric in self.metrics[name]:
                metric.update(s, t)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        for name, (cka, procrustes) in self.metrics.items():
            pl_module.log(f"val/align/{name}/cka", cka.compute().float())
            pl_module.log(f"val/align/{name}/procrustes", procrustes.compute().float())

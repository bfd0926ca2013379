"""``TeacherClassMeans``: the teacher's per-class mean embeddings over the training set, for ND."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info

from kd_lightning.callbacks.schedules import find_loss
from kd_lightning.losses import functional
from kd_lightning.methods.teacher_statistics import teacher_embeddings


class TeacherClassMeans(pl.Callback):
    """At fit start, set an :class:`~kd_lightning.losses.NDLoss`'s class means ``c_y``.

    ``c_y`` is the mean of the teacher's embedding (the loss's teacher tap) over the training
    examples labelled ``y`` (KD++, Wang et al., 2023). The means live in the loss's buffers, so
    they are saved in every checkpoint; a resumed run restores them and does not recompute.

    Args:
        loss: the ND loss's ``name``.
        batch_size: batch size of the teacher pass.
    """

    def __init__(self, loss: str = "nd_loss", batch_size: int = 64) -> None:
        self.loss_name = loss
        self.batch_size = batch_size

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loss = find_loss(pl_module, self.loss_name)
        if not hasattr(loss, "set_class_means"):
            raise ValueError(f"TeacherClassMeans: loss {self.loss_name!r} ({type(loss).__name__}) takes no class means")
        if bool(loss.has_class_means):
            rank_zero_info(f"TeacherClassMeans: class means of {self.loss_name!r} restored from the checkpoint")
            return
        embeddings, labels, _ = teacher_embeddings(pl_module, trainer.datamodule, loss.teacher_tap, self.batch_size)
        means = functional.mean_per_class(embeddings, labels, pl_module.num_labels)
        loss.set_class_means(means.to(pl_module.device))

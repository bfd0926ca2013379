"""Export the trained student as a Hugging Face folder at the end of fit."""

from __future__ import annotations

import os

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_info


class ExportHF(pl.Callback):
    """At the end of fit, ``save_pretrained`` the student (and its tokenizer) into ``dirpath``.

    The folder loads back with ``AutoModelForSequenceClassification.from_pretrained`` and
    ``AutoTokenizer.from_pretrained``, and can be named as a distillation teacher.

    Args:
        dirpath: where to write; default ``<run dir>/export``.
        use_best: export the weights of the best checkpoint of the run's ``ModelCheckpoint``
            (its monitored validation metric) rather than the last step's.
    """

    def __init__(self, dirpath: str | None = None, use_best: bool = True) -> None:
        self.dirpath = dirpath
        self.use_best = use_best
        self.exported_to: str | None = None

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        best = trainer.checkpoint_callback.best_model_path if isinstance(trainer.checkpoint_callback, ModelCheckpoint) else ""
        if self.use_best and best and os.path.isfile(best):
            # A single-file checkpoint holds the full state dict, also under FSDP (state_dict_type: full).
            state = torch.load(best, map_location="cpu", weights_only=False)["state_dict"]
            if not is_sharded(trainer):
                pl_module.load_state_dict(state)
            rank_zero_info(f"ExportHF: exporting the best checkpoint {best}")
        else:
            # Under FSDP this gathers the shards (every process takes part); elsewhere it is the module's own.
            state = trainer.strategy.lightning_module_state_dict()
        dirpath = self.dirpath or os.path.join(trainer.log_dir or ".", "export")
        if trainer.is_global_zero:
            student = {key.removeprefix("student."): value for key, value in state.items() if key.startswith("student.")}
            pl_module.export(dirpath, student)
            from kd_lightning.finetune import FineTuneModule

            what = "fine-tuned model" if isinstance(pl_module, FineTuneModule) else "student"
            rank_zero_info(f"ExportHF: {what} saved to {dirpath}")
        self.exported_to = dirpath


def is_sharded(trainer: pl.Trainer) -> bool:
    """Whether the trainer's strategy shards the module's parameters (FSDP)."""
    return isinstance(trainer.strategy, FSDPStrategy)

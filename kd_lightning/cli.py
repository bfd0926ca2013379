"""The command line: LightningCLI's ``fit``/``validate``/``test``/``predict`` plus our own commands.

``python -m kd_lightning fit --config configs/quickstart/distill.yaml``
``python -m kd_lightning modules all-MiniLM-L6-v2``      (list a model's tap paths)
``python -m kd_lightning quickstart``                    (teacher fine-tune + distillation)
``python -m kd_lightning cache --config distill.yaml``    (build the teacher-output cache)
"""

from __future__ import annotations

import sys
from typing import Any

from lightning.pytorch.cli import LightningCLI


def trainer_defaults() -> dict[str, Any]:
    """TensorBoard under ``runs/``, rich progress bar and model summary, LR logging, run summary."""
    from lightning.pytorch.callbacks import LearningRateMonitor, RichModelSummary, RichProgressBar

    from kd_lightning.callbacks import RunSummary
    from kd_lightning.checkpointing import ResumableRNG

    return {
        "logger": {
            "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
            "init_args": {"save_dir": "runs", "name": "kd_lightning"},
        },
        "callbacks": [
            RichProgressBar(),
            RichModelSummary(max_depth=1),
            LearningRateMonitor(logging_interval="step"),
            RunSummary(),
            ResumableRNG(),
        ],
    }


class KDLightningCLI(LightningCLI):
    """LightningCLI with the project's defaults: TensorBoard under ``runs/``, rich progress and
    model summary, learning-rate logging, a run summary, and — unless the config lists its own
    ``ModelCheckpoint`` — a checkpoint on the data module's validation metric (``monitor``,
    ``monitor_mode``: ``val/acc`` for classification, Matthews correlation for CoLA, ...)."""

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        from lightning.pytorch.callbacks import ModelCheckpoint

        from kd_lightning.checkpointing import last_checkpoint, with_atomic_checkpoint_io

        trainer_config = self._get(self.config_init, "trainer", default={})
        configured = list(kwargs.get("callbacks", trainer_config.get("callbacks") or []))
        wants_checkpoints = trainer_config.get("enable_checkpointing", True) is not False
        if wants_checkpoints and not any(isinstance(c, ModelCheckpoint) for c in configured):
            monitor = getattr(self.datamodule, "monitor", None) or "val/acc"
            mode = getattr(self.datamodule, "monitor_mode", None) or "max"
            name = "best-{step}"
            best = ModelCheckpoint(monitor=monitor, mode=mode, filename=name)
            kwargs["callbacks"] = [*configured, best, last_checkpoint()]
        kwargs["plugins"] = with_atomic_checkpoint_io(kwargs.get("plugins", trainer_config.get("plugins")))
        return super().instantiate_trainer(**kwargs)

    def before_instantiate_classes(self) -> None:
        """``--ckpt_path last`` resumes the newest run of the configured logger, in that run's folder."""
        from kd_lightning.checkpointing import resolve_last_checkpoint

        resolve_last_checkpoint(self.config[self.subcommand] if self.subcommand else self.config)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("trainer_defaults", trainer_defaults())
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(*args, **kwargs)


COMMANDS = {
    "cache": "kd_lightning.commands.cache",
    "modules": "kd_lightning.commands.modules",
    "quickstart": "kd_lightning.commands.quickstart",
}


def main(argv: list[str] | None = None) -> Any:
    """Dispatch our own commands; everything else goes to LightningCLI."""
    argv = list(sys.argv[1:] if argv is None else argv)
    _quiet_transformers()
    if argv and argv[0] in COMMANDS:
        import importlib

        return importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])
    return KDLightningCLI(args=argv)


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()

"""The command line: LightningCLI's ``fit``/``validate``/``test``/``predict`` plus our own commands.

``python -m kd_lightning fit --config configs/quickstart/distill.yaml``
``python -m kd_lightning modules all-MiniLM-L6-v2``      (list a model's tap paths)
``python -m kd_lightning quickstart``                    (teacher fine-tune + distillation)
``python -m kd_lightning cache --config distill.yaml``    (build the teacher-output cache)
``python -m kd_lightning convert SmolLM2-135M-Instruct``  (convert a packaged GGUF model once)
"""

from __future__ import annotations

import sys
from typing import Any

from lightning.pytorch.cli import LightningCLI

from kd_lightning.preflight import HintingArgumentParser


def in_notebook() -> bool:
    """Whether this runs in a Jupyter kernel."""
    ipython = sys.modules.get("IPython")
    return ipython is not None and type(ipython.get_ipython()).__name__ == "ZMQInteractiveShell"


def trainer_defaults() -> dict[str, Any]:
    """TensorBoard under ``runs/``, rich progress bar and model summary, LR logging, run summary,
    and exact resumes (random generators in checkpoints, training epoch set from the trainer).
    In a notebook, Lightning's tqdm progress bar and plain summary: rich's live display
    redirects the kernel's output streams, and the next tqdm bar then recurses without end."""
    from lightning.pytorch.callbacks import (
        LearningRateMonitor,
        ModelSummary,
        RichModelSummary,
        RichProgressBar,
        TQDMProgressBar,
    )

    from kd_lightning.callbacks import RunSummary
    from kd_lightning.checkpointing import ResumableRNG, TrainingEpochSync

    return {
        "logger": {
            "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
            "init_args": {"save_dir": "runs", "name": "kd_lightning"},
        },
        "callbacks": [
            TQDMProgressBar() if in_notebook() else RichProgressBar(),
            ModelSummary(max_depth=1) if in_notebook() else RichModelSummary(max_depth=1),
            LearningRateMonitor(logging_interval="step"),
            RunSummary(),
            ResumableRNG(),
            TrainingEpochSync(),
        ],
    }


def switched_off(trainer_config: dict[str, Any], callback: Any) -> bool:
    """Whether ``callback`` is a default progress bar or model summary that the config turns off
    (``enable_progress_bar: false``, ``enable_model_summary: false``)."""
    from lightning.pytorch.callbacks import ModelSummary, ProgressBar

    if isinstance(callback, ProgressBar):
        return trainer_config.get("enable_progress_bar") is False
    return isinstance(callback, ModelSummary) and trainer_config.get("enable_model_summary") is False


class KDLightningCLI(LightningCLI):
    """LightningCLI with the project's defaults: TensorBoard under ``runs/``, rich progress and
    model summary, learning-rate logging, a run summary, the run's config in TensorBoard's
    HPARAMS tab beside its final metrics (:class:`~kd_lightning.callbacks.HParamsSummary`),
    and — unless the config lists its own ``ModelCheckpoint`` — a checkpoint on the data
    module's validation metric (``monitor``, ``monitor_mode``: ``val/acc`` for classification,
    Matthews correlation for CoLA, ...)."""

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        from lightning.pytorch.callbacks import ModelCheckpoint

        from kd_lightning.callbacks.hparams import HParamsSummary
        from kd_lightning.checkpointing import last_checkpoint, with_atomic_checkpoint_io

        trainer_config = self._get(self.config_init, "trainer", default={})
        self.trainer_defaults["callbacks"] = [
            c for c in self.trainer_defaults.get("callbacks", []) if not switched_off(trainer_config, c)
        ]
        configured = list(kwargs.get("callbacks", trainer_config.get("callbacks") or []))
        wants_checkpoints = trainer_config.get("enable_checkpointing", True) is not False
        if wants_checkpoints and not any(isinstance(c, ModelCheckpoint) for c in configured):
            monitor = getattr(self.datamodule, "monitor", None) or "val/acc"
            mode = getattr(self.datamodule, "monitor_mode", None) or "max"
            name = "best-{step}"
            best = ModelCheckpoint(monitor=monitor, mode=mode, filename=name)
            kwargs["callbacks"] = [*configured, best, last_checkpoint()]
        kwargs["callbacks"] = [*kwargs.get("callbacks", configured), HParamsSummary(self.run_config())]
        kwargs["plugins"] = with_atomic_checkpoint_io(kwargs.get("plugins", trainer_config.get("plugins")))
        return super().instantiate_trainer(**kwargs)

    def run_config(self) -> dict[str, Any]:
        """This run's parsed config as plain nested data, as ``config.yaml`` holds it."""
        import yaml

        config = self.config[self.subcommand] if self.subcommand else self.config
        return yaml.safe_load(self._parser(self.subcommand).dump(config, skip_none=False)) or {}

    def before_instantiate_classes(self) -> None:
        """``--ckpt_path last`` resumes the newest run of the configured logger, in that run's folder."""
        from kd_lightning.checkpointing import resolve_last_checkpoint

        resolve_last_checkpoint(self.config[self.subcommand] if self.subcommand else self.config)

    def parse_arguments(self, parser: Any, args: Any) -> None:
        """Parse, then refuse a ``--ckpt_path`` that is missing or not a checkpoint, before
        Lightning reads its hyperparameters."""
        from kd_lightning.preflight import check_checkpoint_file

        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        check_checkpoint_file(self.config[subcommand].get("ckpt_path") if subcommand else None)

    def check_resumed_checkpoint(self) -> None:
        """A ``--ckpt_path`` saved from another architecture fails here, before the run writes anything."""
        from kd_lightning.preflight import check_checkpoint_fits

        check_checkpoint_fits(self.model, self.config[self.subcommand].get("ckpt_path"))

    before_fit = before_validate = before_test = before_predict = check_resumed_checkpoint

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("trainer_defaults", trainer_defaults())
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_class", HintingArgumentParser)
        super().__init__(*args, **kwargs)


COMMANDS = {
    "cache": "kd_lightning.commands.cache",
    "convert": "kd_lightning.commands.convert",
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

"""``HParamsSummary``: each run as one row of TensorBoard's HPARAMS tab, its config beside its results."""

from __future__ import annotations

import dataclasses
import time
from argparse import Namespace
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_only

HParamValue = bool | int | float | str


def flatten_config(config: Any, prefix: str = "") -> dict[str, HParamValue]:
    """Nested mappings, lists and dataclasses as dotted keys, the keys the command line overrides
    (``model.init_args.losses.1.init_args.temperature``); ``None`` and empty containers as text."""
    if isinstance(config, Namespace):
        config = vars(config)
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    if isinstance(config, Mapping):
        items = [(str(key), value) for key, value in config.items()]
    elif isinstance(config, (list, tuple)):
        items = [(str(i), value) for i, value in enumerate(config)]
    else:
        return {prefix: config if isinstance(config, HParamValue) else str(config)}
    if not items:
        return {prefix: "{}" if isinstance(config, Mapping) else "[]"} if prefix else {}
    flat: dict[str, HParamValue] = {}
    for key, value in items:
        flat.update(flatten_config(value, f"{prefix}.{key}" if prefix else key))
    return flat


def _hparams_summary(tag: str, **data: Any) -> Any:
    """A TensorBoard ``Summary`` carrying one record of the hparams plugin."""
    from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
    from tensorboard.plugins.hparams import metadata, plugin_data_pb2

    content = plugin_data_pb2.HParamsPluginData(version=metadata.PLUGIN_DATA_VERSION, **data).SerializeToString()
    plugin = SummaryMetadata.PluginData(plugin_name=metadata.PLUGIN_NAME, content=content)
    return Summary(value=[Summary.Value(tag=tag, metadata=SummaryMetadata(plugin_data=plugin))])


def session_start(params: Mapping[str, HParamValue]) -> Any:
    """The session-start record of the hparams plugin: the run's hyper-parameter values."""
    from tensorboard.plugins.hparams import metadata, plugin_data_pb2

    info = plugin_data_pb2.SessionStartInfo(start_time_secs=time.time())
    for name, value in params.items():
        if isinstance(value, bool):
            info.hparams[name].bool_value = value
        elif isinstance(value, (int, float)):
            info.hparams[name].number_value = float(value)
        else:
            info.hparams[name].string_value = str(value)
    return _hparams_summary(metadata.SESSION_START_INFO_TAG, session_start_info=info)


def session_end(success: bool) -> Any:
    """The session-end record of the hparams plugin: success or failure, and when."""
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

    status = api_pb2.STATUS_SUCCESS if success else api_pb2.STATUS_FAILURE
    info = plugin_data_pb2.SessionEndInfo(status=status, end_time_secs=time.time())
    return _hparams_summary(metadata.SESSION_END_INFO_TAG, session_end_info=info)


class HParamsSummary(pl.Callback):
    """One row per run in TensorBoard's HPARAMS tab: the run's hyper-parameters and its metrics.

    At set-up, the run's TensorBoard folder gets a session-start record holding ``params``
    flattened by :func:`flatten_config`; at the end of fit, validate or test, a session-end
    record (success, or failure after an exception). TensorBoard shows beside them the latest
    value of every scalar of the run, so the row ends with the run's final ``val/*``,
    ``val/teacher/*`` and, once tested, ``test/*`` metrics — and is there, updating, while the
    run trains.

    No experiment record is written: without one TensorBoard takes the columns from the
    hyper-parameters of every run (runs of different methods list different losses, so
    different keys), where an experiment record would impose one run's columns on all. For the
    same reason the logger's placeholder ``hp_metric`` record is turned off: TensorBoard keeps
    only the first record of each kind in a run.

    The command line adds this callback to every run with the run's parsed config as
    ``params``; elsewhere add it yourself.

    Args:
        params: nested hyper-parameters; default: the LightningModule's ``hparams``.
    """

    def __init__(self, params: Mapping[str, Any] | None = None) -> None:
        self.params = None if params is None else flatten_config(params)
        self._started: set[str] = set()

    @staticmethod
    def tensorboard_loggers(trainer: pl.Trainer) -> list[TensorBoardLogger]:
        return [logger for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for logger in self.tensorboard_loggers(trainer):
            logger._default_hp_metric = False  # its record, written first, would be the one kept
        self._start(trainer, pl_module)

    @rank_zero_only
    def _start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        params = self.params if self.params is not None else flatten_config(dict(pl_module.hparams))
        for logger in self.tensorboard_loggers(trainer):
            if logger.log_dir not in self._started:
                self._started.add(logger.log_dir)
                logger.experiment._get_file_writer().add_summary(session_start(params), trainer.global_step)

    @rank_zero_only
    def _end(self, trainer: pl.Trainer, success: bool) -> None:
        for logger in self.tensorboard_loggers(trainer):
            writer = logger.experiment._get_file_writer()
            writer.add_summary(session_end(success), trainer.global_step)
            writer.flush()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end(trainer, success=True)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.VALIDATING:
            self._end(trainer, success=True)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end(trainer, success=True)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._end(trainer, success=False)

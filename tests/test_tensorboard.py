"""What a run writes to TensorBoard, read back with TensorBoard's own event reader: every loss
term and weight, the learning rates, student and teacher metrics with ECE, the diagnostics
images, and the HPARAMS row (the run's config beside its final metrics)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
import yaml
from helpers import csv_datamodule, distill_model_config, quiet_trainer
from loss_testing import one_thread  # noqa: F401
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import metadata as hparams_metadata

from kd_lightning import FineTuneModule
from kd_lightning.callbacks import HParamsSummary, ValidationDiagnostics
from kd_lightning.callbacks.hparams import flatten_config
from kd_lightning.cli import main
from kd_lightning.losses import functional as Fn
from kd_lightning.taps import FeatureTaps, TapSpec
from kd_lightning.training import lr_multiplier


def events(run_dir: Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(run_dir), size_guidance={"images": 0, "scalars": 0})
    accumulator.Reload()
    return accumulator


def scalars(accumulator: EventAccumulator) -> dict[str, dict[int, float]]:
    return {tag: {e.step: e.value for e in accumulator.Scalars(tag)} for tag in accumulator.Tags()["scalars"]}


def session_hparams(accumulator: EventAccumulator) -> dict[str, object]:
    content = accumulator.PluginTagToContent(hparams_metadata.PLUGIN_NAME)
    assert hparams_metadata.EXPERIMENT_TAG not in content, "an experiment record would fix every run's columns"
    end = hparams_metadata.parse_session_end_info_plugin_data(content[hparams_metadata.SESSION_END_INFO_TAG])
    assert end.status == 1  # STATUS_SUCCESS
    start = hparams_metadata.parse_session_start_info_plugin_data(content[hparams_metadata.SESSION_START_INFO_TAG])
    return {name: getattr(value, value.WhichOneof("kind")) for name, value in start.hparams.items()}


def hparams_rows(logdir: Path) -> dict[str, dict[str, float]]:
    """The HPARAMS tab's table as TensorBoard's own hparams backend builds it: run -> metric -> value."""
    from tensorboard import context
    from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
    from tensorboard.plugins import base_plugin
    from tensorboard.plugins.hparams import api_pb2, backend_context, list_session_groups

    multiplexer = plugin_event_multiplexer.EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(logdir))
    multiplexer.Reload()
    provider = data_provider.MultiplexerDataProvider(multiplexer, str(logdir))
    backend = backend_context.Context(base_plugin.TBContext(data_provider=provider, multiplexer=multiplexer, logdir=str(logdir)))
    request_context = context.RequestContext()
    experiment = backend.experiment_from_metadata(
        request_context, "", True, backend.hparams_metadata(request_context, ""), backend.hparams_from_data_provider(request_context, "", 1000)
    )
    request = api_pb2.ListSessionGroupsRequest(start_index=0, slice_size=100, allowed_statuses=[0, 1, 2, 3])
    for metric in experiment.metric_infos:
        request.col_params.add(metric=metric.name)
    response = list_session_groups.Handler(request_context, backend, "", request).run()
    return {group.name: {value.name.tag: value.value for value in group.metric_values} for group in response.session_groups}


def last(values: dict[int, float]) -> float:
    return values[max(values)]


def distill_config(teacher: Path, files: dict[str, str]) -> dict:
    return {
        "seed_everything": 0,
        "model": distill_model_config(teacher),
        "data": {
            "class_path": "kd_lightning.data.TextClassificationDataModule",
            "init_args": {"data_files": files, "max_length": 16, "batch_size": 16},
        },
        "trainer": {
            "max_steps": 4,
            "val_check_interval": 2,
            "log_every_n_steps": 1,
            "enable_model_summary": False,
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"save_dir": "runs", "name": "kd"}},
            "callbacks": [{"class_path": "kd_lightning.callbacks.ValidationDiagnostics"}],
        },
    }


@torch.no_grad()
def layer_rows(module, datamodule) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Mean-pooled rows of every student and teacher layer over the validation set, in one pass."""
    specs = {
        "s0": TapSpec("student", "bert.encoder.layer.0", "mean"),
        "t0": TapSpec("teacher", "bert.encoder.layer.0", "mean"),
        "t1": TapSpec("teacher", "bert.encoder.layer.1", "mean"),
    }
    student_taps, teacher_taps = FeatureTaps(module.student, specs, "student"), FeatureTaps(module.teacher, specs, "teacher")
    rows: dict[str, list[torch.Tensor]] = {name: [] for name in specs}
    module.eval()
    for batch in datamodule.val_dataloader():
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
        module.student(**inputs)
        module.teacher(**inputs)
        for taps in (student_taps, teacher_taps):
            for name, value in taps.collect(batch["attention_mask"]).items():
                rows[name].append(value.double())
    student_taps.remove()
    teacher_taps.remove()
    joined = {name: torch.cat(parts) for name, parts in rows.items()}
    return [joined["s0"]], [joined["t0"], joined["t1"]]


@pytest.mark.usefixtures("one_thread")  # tiny models: one thread, no OpenMP spin-waits on a loaded machine
def test_cli_run_shows_terms_metrics_images_and_hparams(tiny_bert, tiny_csv, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "distill.yaml"
    config.write_text(yaml.safe_dump(distill_config(tiny_bert, tiny_csv)))
    cli = main(["fit", "--config", str(config)])
    run_dir = tmp_path / "runs" / "kd" / "version_0"
    accumulator = events(run_dir)
    logged = scalars(accumulator)

    # every loss term and its weight, at every step; the learning rate of both parameter groups
    weights = {"cross_entropy": 0.5, "kl_divergence": 0.5, "projected_mse": 1.0}
    for name, weight in weights.items():
        assert sorted(logged[f"train/loss/{name}"]) == [0, 1, 2, 3]
        assert logged[f"train/weight/{name}"] == {step: pytest.approx(weight) for step in range(4)}
    for step, total in logged["train/loss"].items():
        assert total == pytest.approx(sum(logged[f"train/loss/{n}"][step] * w for n, w in weights.items()), rel=1e-5)
    for group in ("lr-AdamW/pg1", "lr-AdamW/pg2"):
        assert logged[group] == {s: pytest.approx(1e-3 * lr_multiplier(s, 4, int(0.1 * 4), "linear")) for s in range(4)}

    # student metrics at each validation, the teacher's once; ECE for both
    for tag in ("val/acc", "val/f1", "val/ece", "val/loss"):
        assert sorted(logged[tag]) == [1, 3], tag  # logged at the step index of validations after 2 and 4 steps
    for tag in ("val/teacher/acc", "val/teacher/f1", "val/teacher/ece"):
        assert list(logged[tag]) == [0] and 0.0 <= logged[tag][0] <= 1.0

    # the diagnostics images at each validation, and what they show
    diagnostics = next(c for c in cli.trainer.callbacks if isinstance(c, ValidationDiagnostics))
    assert set(accumulator.Tags()["images"]) == {"val/layer_cka", "val/reliability"}
    for tag in ("val/layer_cka", "val/reliability"):
        images = accumulator.Images(tag)
        assert [image.step for image in images] == [1, 3]  # beside the validation scalars
        decoded = Image.open(io.BytesIO(images[-1].encoded_image_string))
        assert decoded.size == (images[-1].width, images[-1].height) and decoded.width >= 300
    assert diagnostics.curves["student"].ece.item() == pytest.approx(last(logged["val/ece"]), abs=1e-6)
    assert diagnostics.curves["teacher"].ece.item() == pytest.approx(logged["val/teacher/ece"][0], abs=1e-6)
    student, teacher = layer_rows(cli.model, cli.datamodule)
    expected = torch.tensor([[Fn.linear_cka(s, t).item() for s in student] for t in teacher], dtype=torch.float64)
    assert diagnostics.layer_cka.shape == (2, 1)
    torch.testing.assert_close(diagnostics.layer_cka, expected, rtol=1e-6, atol=1e-8)

    # the HPARAMS row: the parsed config, flattened, beside the run's final metrics
    hparams = session_hparams(accumulator)
    written = flatten_config({"model": distill_model_config(tiny_bert)})  # every value the config file sets
    assert {key: hparams[key] for key in written} == written and "model.init_args.losses.2.class_path" in written
    assert hparams["data.init_args.batch_size"] == 16 and hparams["trainer.max_steps"] == 4
    assert hparams["model.init_args.save_teacher"] is False and hparams["model.init_args.teacher_cache"] == "None"
    assert hparams["trainer.callbacks.0.class_path"] == "kd_lightning.callbacks.ValidationDiagnostics"
    summary = json.loads((run_dir / "summary.json").read_text())
    for tag, value in {**summary["student_metrics"], **summary["teacher_metrics"]}.items():
        assert last(logged[tag]) == pytest.approx(value), tag  # the row shows each scalar's latest value

    # testing the checkpoint is a run of its own: its row holds test/* for student and teacher
    main(["test", "--config", str(config), "--ckpt_path", str(run_dir / "checkpoints" / "last.ckpt")])
    tested = events(tmp_path / "runs" / "kd" / "version_1")
    assert {"test/acc", "test/f1", "test/ece", "test/teacher/acc", "test/teacher/ece"} <= set(scalars(tested))
    assert session_hparams(tested)["model.init_args.losses.0.init_args.weight"] == 0.5

    # the HPARAMS tab as TensorBoard builds it: one row per run, each with that run's final metrics
    rows = hparams_rows(tmp_path / "runs")
    assert set(rows) == {"kd/version_0", "kd/version_1"}
    for tag, value in {**summary["student_metrics"], **summary["teacher_metrics"]}.items():
        assert rows["kd/version_0"][tag] == pytest.approx(value), tag
    assert rows["kd/version_1"]["test/teacher/ece"] == pytest.approx(last(scalars(tested)["test/teacher/ece"]))


@pytest.mark.usefixtures("one_thread")
def test_diagnostics_of_a_module_without_teacher_draw_the_students_reliability(tiny_bert, tiny_csv, tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger

    module = FineTuneModule(str(tiny_bert), num_labels=2)
    diagnostics = ValidationDiagnostics(n_bins=5)
    logger = TensorBoardLogger(str(tmp_path), name="tb", version=0)
    callbacks = [diagnostics, HParamsSummary({"lr": 1e-3, "tags": []})]
    trainer = quiet_trainer(tmp_path, logger=logger, callbacks=callbacks, limit_val_batches=1.0)
    trainer.validate(module, datamodule=csv_datamodule(tiny_csv, tokenizer=str(tiny_bert)), verbose=False)
    accumulator = events(tmp_path / "tb" / "version_0")
    assert accumulator.Tags()["images"] == ["val/reliability"]
    assert list(diagnostics.curves) == ["student"] and diagnostics.layer_cka is None
    assert diagnostics.curves["student"].count.sum() == 32  # every validation row
    assert session_hparams(accumulator) == {"lr": 1e-3, "tags": "[]"}


def test_diagnostics_name_a_wrong_layer_path_before_training(tiny_bert):
    from helpers import distill_module

    module = distill_module(tiny_bert)
    with pytest.raises(ValueError, match=r"tap path 'bert.encoder.layers.0' does not exist in the teacher.*bert.encoder.layer.0"):
        ValidationDiagnostics(teacher_layers=["bert.encoder.layers.0"]).setup(None, module, "fit")
    with pytest.raises(ValueError, match="reduce must be 'mean', 'cls' or 'tokens'"):
        ValidationDiagnostics(reduce="max")


def test_flatten_config_gives_the_override_keys():
    nested = {"model": {"init_args": {"losses": [{"class_path": "a.B", "init_args": {"weight": 0.5, "name": None}}], "taps": {}}},
              "trainer": {"devices": "auto", "deterministic": True, "callbacks": []}}
    assert flatten_config(nested) == {
        "model.init_args.losses.0.class_path": "a.B",
        "model.init_args.losses.0.init_args.weight": 0.5,
        "model.init_args.losses.0.init_args.name": "None",
        "model.init_args.taps": "{}",
        "trainer.devices": "auto",
        "trainer.deterministic": True,
        "trainer.callbacks": "[]",
    }

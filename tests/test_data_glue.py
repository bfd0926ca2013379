"""GLUE through the hub code path (``load_dataset("nyu-mll/glue", task)`` served from local parquet
files in the hub's schema), end to end through short fits with a tiny BERT."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from data_helpers import GLUE_SCHEMAS
from helpers import quiet_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from scipy.stats import spearmanr
from sklearn.metrics import matthews_corrcoef

from kd_lightning import DistillModule, FineTuneModule, StudentSpec, TeacherSpec
from kd_lightning.data import GLUE_TASKS, GlueDataModule
from kd_lightning.losses import CrossEntropy, KLDivergence, LabelMSE, ScoreMSE

pytest_plugins = ("data_fixtures",)


def glue(task: str, **kwargs) -> GlueDataModule:
    return GlueDataModule(task, max_length=16, batch_size=8, **kwargs)


@pytest.mark.parametrize("task", sorted(GLUE_TASKS))
def test_every_task_reads_its_hub_schema(task, hub, hub_mirror, tiny_encoder):
    dm = glue(task, tokenizer=str(tiny_encoder))
    dm.setup("fit")
    assert hub == [("nyu-mll/glue", task, {})]
    text, names = GLUE_SCHEMAS[task]
    # validation is the hub's (matched) validation split; test is the dev set again (mismatched for MNLI)
    files = hub_mirror[("nyu-mll/glue", task)]
    expected_test = "validation_mismatched" if task == "mnli" else "validation"
    assert dm.split_record["source_splits"]["test"] == expected_test
    assert {k: len(v) for k, v in dm.datasets.items()} == {"train": 48, "validation": 20, "test": 20}
    assert "test_matched" in files or "test" in files  # the hidden-label test split exists but is not used
    batch = next(iter(dm.val_dataloader()))
    assert batch["input_ids"].shape[0] == 16
    if len(text) == 2:  # a sentence pair: two segments
        assert int(batch["token_type_ids"].max()) == 1
    if names is None:
        assert dm.is_regression and dm.num_labels == 1 and batch["labels"].dtype == torch.float32
        assert set(dm.task_metrics().keys()) == {"pearson", "spearman", "mse"}
    else:
        assert dm.num_labels == len(names) and dm.label_names == list(names)
        assert batch["labels"].dtype == torch.int64 and int(batch["labels"].min()) >= 0
    assert dm.monitor in {f"val/{k}" for k in dm.task_metrics().keys()}


def test_cola_fit_selects_checkpoints_by_mcc_and_logs_official_metrics(hub, tiny_encoder, tmp_path):
    dm = glue("cola")
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor=dm.monitor, mode=dm.monitor_mode)
    trainer = quiet_trainer(tmp_path, callbacks=[checkpoint], enable_checkpointing=True, max_steps=4, val_check_interval=2)
    model = FineTuneModule(str(tiny_encoder), num_labels=2)
    trainer.fit(model, dm)
    assert dm.monitor == "val/mcc"
    assert checkpoint.best_model_path and checkpoint.best_model_score is not None
    assert {"val/mcc", "val/acc", "val/ece"} <= set(trainer.callback_metrics)

    # the logged MCC is sklearn's on the same predictions (test = the validation rows for GLUE)
    (result,) = trainer.test(model, dm, verbose=False)
    probs = torch.cat(trainer.predict(model, dm))
    labels = np.array(dm.datasets["validation"]["labels"])
    assert result["test/mcc"] == pytest.approx(matthews_corrcoef(labels, probs.argmax(-1).numpy()), abs=1e-6)


def test_stsb_regression_fine_tune_then_distil_with_score_mse(hub, tiny_encoder, tmp_path):
    teacher = FineTuneModule(str(tiny_encoder), num_labels=1)
    assert teacher.is_regression
    trainer = quiet_trainer(tmp_path / "teacher")
    trainer.fit(teacher, glue("stsb"))
    assert {"val/pearson", "val/spearman", "val/mse"} <= set(trainer.callback_metrics)
    teacher.export(str(tmp_path / "teacher_export"))

    student = DistillModule(
        teacher=TeacherSpec(str(tmp_path / "teacher_export")),
        student=StudentSpec(from_teacher_layers=[0]),
        losses=[LabelMSE(weight=0.2), ScoreMSE(weight=0.8, temperature=2.0)],
    )
    dm = glue("stsb")
    trainer = quiet_trainer(tmp_path / "student")
    trainer.fit(student, dm)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert "val/teacher/spearman" in student.teacher_metrics
    (result,) = trainer.test(student, dm, verbose=False)
    scores = torch.cat(trainer.predict(student, dm))
    assert scores.shape == (20,)  # scores, not probabilities
    labels = np.array(dm.datasets["test"]["labels"])
    assert result["test/spearman"] == pytest.approx(spearmanr(scores.numpy(), labels).statistic, abs=1e-5)
    assert {"test/teacher/pearson", "test/teacher/mse"} <= set(result)


def test_mnli_distillation_reports_matched_validation_and_mismatched_test(hub, hub_mirror, tiny_encoder, tmp_path):
    import datasets

    model = DistillModule(
        teacher=TeacherSpec(str(tiny_encoder), num_labels=3),
        student=StudentSpec(from_teacher_layers=[1]),
        losses=[CrossEntropy(weight=0.2), KLDivergence(weight=0.8, temperature=3.0)],
    )
    dm = glue("mnli", max_eval_samples=10)
    trainer = quiet_trainer(tmp_path)
    trainer.fit(model, dm)
    (result,) = trainer.test(model, dm, verbose=False)
    assert {"test/acc", "test/ece", "test/teacher/acc"} <= set(result)
    files = hub_mirror[("nyu-mll/glue", "mnli")]
    mismatched = datasets.load_dataset("parquet", data_files={"x": files["validation_mismatched"]})["x"]
    # max_eval_samples keeps 10 rows drawn with split_seed (0), in the split's order
    keep = sorted(np.random.default_rng(0).permutation(len(mismatched))[:10].tolist())
    assert list(dm.datasets["test"]["labels"]) == [mismatched["label"][i] for i in keep]


def test_mrpc_logs_positive_class_f1(hub, tiny_encoder, tmp_path):
    trainer = quiet_trainer(tmp_path)
    trainer.fit(FineTuneModule(str(tiny_encoder), num_labels=2), glue("mrpc"))
    assert {"val/f1", "val/acc", "val/ece"} == {k for k in trainer.callback_metrics if k.startswith("val/") and k != "val/loss"}


def test_local_files_in_the_hub_layout_replace_the_download(hub_mirror, tiny_encoder, monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        if args and args[0] == "nyu-mll/glue":
            raise ConnectionError("no hub here")
        return real(*args, **kwargs)

    real = datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ValueError, match=r"cannot load the data set 'nyu-mll/glue' \(rte\) from the hub.*data_files"):
        glue("rte", tokenizer=str(tiny_encoder)).setup("fit")
    dm = glue("mnli", tokenizer=str(tiny_encoder), data_files=hub_mirror[("nyu-mll/glue", "mnli")])
    dm.setup("fit")
    assert dm.num_labels == 3 and len(dm.datasets["test"]) == 20


def test_model_and_task_must_agree_on_outputs(hub, tiny_encoder, tmp_path):
    with pytest.raises(ValueError, match=r"the data is a regression task \(one output\) but the model has 2 output"):
        quiet_trainer(tmp_path).fit(FineTuneModule(str(tiny_encoder), num_labels=2), glue("stsb"))


def test_unknown_task_is_named():
    with pytest.raises(ValueError, match="unknown GLUE task 'sst-2'; choose one of cola, sst2"):
        GlueDataModule("sst-2")

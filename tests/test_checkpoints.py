"""Checkpoints: what they hold, atomic writes, and resuming with ``--ckpt_path last`` through the CLI."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml
from helpers import csv_datamodule, distill_model_config, distill_module, quiet_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.precision import Precision

from kd_lightning import DistillModule
from kd_lightning.callbacks import TeacherClassMeans
from kd_lightning.checkpointing import (
    AtomicCheckpointIO,
    ResumableRNG,
    resolve_last_checkpoint,
    with_atomic_checkpoint_io,
)
from kd_lightning.cli import main
from kd_lightning.losses import CrossEntropy, KLDivergence, NDLoss, ProjectedMSE


def test_checkpoint_holds_the_training_state_but_not_the_teacher(tiny_bert, tiny_csv, tmp_path):
    losses = [
        CrossEntropy(weight=0.5),
        KLDivergence(weight=0.5),
        ProjectedMSE(student="s_last", teacher="t_last", weight=0.1),  # a learned projection
        NDLoss(student="s_last", teacher="t_last", weight=0.1),  # precomputed teacher class means
    ]
    module = distill_module(tiny_bert, losses=losses)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=2)
    trainer = quiet_trainer(
        tmp_path,
        max_steps=2,
        enable_checkpointing=True,
        callbacks=[TeacherClassMeans(loss="nd_loss"), ResumableRNG(), checkpoints],
        plugins=[AtomicCheckpointIO()],
    )
    trainer.fit(module, datamodule=csv_datamodule(tiny_csv))
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)

    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    state = checkpoint["state_dict"]
    assert {key.split(".")[0] for key in state} == {"student", "losses"}, "no teacher weights"
    assert "teacher_state_dict" not in checkpoint
    trained = {k: v for k, v in module.state_dict().items()}
    assert set(state) == set(trained) and all(torch.equal(state[k], trained[k]) for k in state)
    assert state["losses.2.projection.weight"].shape == (32, 16)
    assert bool(state["losses.3.has_class_means"]) and state["losses.3.class_means"].abs().sum() > 0

    [optimizer] = checkpoint["optimizer_states"]
    trainable = sum(1 for m in module.trainable_modules() for p in m.parameters())
    assert len(optimizer["state"]) == trainable and {int(s["step"]) for s in optimizer["state"].values()} == {2}
    assert checkpoint["lr_schedulers"][0]["last_epoch"] == 2
    assert checkpoint["global_step"] == 2 and checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]
    assert set(checkpoint["callbacks"]["ResumableRNG"]["rng_states"]) >= {"python", "numpy", "torch"}
    assert checkpoint["skipped_nonfinite"] == 0

    # with save_teacher the teacher is saved too, and loaded back
    module.save_teacher = True
    trainer.save_checkpoint(tmp_path / "with_teacher.ckpt")
    with_teacher = torch.load(tmp_path / "with_teacher.ckpt", weights_only=False)
    teacher_state = module.teacher.state_dict()
    assert set(with_teacher["teacher_state_dict"]) == set(teacher_state)
    fresh = distill_module(tiny_bert, losses=[CrossEntropy(), KLDivergence()], taps={})
    with torch.no_grad():
        next(fresh.teacher.parameters()).add_(1.0)
    fresh.on_load_checkpoint(with_teacher)
    assert all(torch.equal(fresh.teacher.state_dict()[k], v) for k, v in teacher_state.items())


# ---- atomic writes -----------------------------------------------------------------------------
def test_a_crash_while_saving_leaves_the_last_good_checkpoint_readable(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "weight": torch.ones(3)}, path)
    assert path.stat().st_mode & 0o777 == 0o666 & ~_umask(), "the checkpoint gets normal file permissions"

    def crash_mid_write(obj, handle, *args, **kwargs):
        handle.write(b"PK\x03\x04 half a zip archive")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", crash_mid_write)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"global_step": 2, "weight": torch.zeros(3)}, path)
    monkeypatch.undo()

    restored = io.load_checkpoint(path)
    assert restored["global_step"] == 1 and torch.equal(restored["weight"], torch.ones(3))
    assert os.listdir(tmp_path) == ["last.ckpt"], "the temporary file is removed"

    io.save_checkpoint({"global_step": 3}, path)  # and the next save goes through
    assert io.load_checkpoint(path)["global_step"] == 3


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_the_atomic_io_is_added_unless_a_checkpoint_io_is_given():
    assert [type(p) for p in with_atomic_checkpoint_io(None)] == [AtomicCheckpointIO]
    precision = Precision()
    assert [type(p) for p in with_atomic_checkpoint_io(precision)] == [Precision, AtomicCheckpointIO]
    own = AtomicCheckpointIO()
    assert with_atomic_checkpoint_io([own]) == [own]


# ---- resume through the CLI --------------------------------------------------------------------
def run_config(tiny_bert: Path, tiny_csv: dict[str, str], path: Path) -> Path:
    """6 steps, 2 epochs of 3 (96 rows, batch 32), shuffled data, dropout on (the student's
    config default): every source of randomness a resumed run has to reproduce."""
    model = distill_model_config(tiny_bert)
    data = {
        "class_path": "kd_lightning.data.TextClassificationDataModule",
        "init_args": {"data_files": tiny_csv, "max_length": 16, "batch_size": 32},
    }
    config = {"seed_everything": 0, "model": model, "data": data, "trainer": {"max_steps": 6, "log_every_n_steps": 1}}
    path.write_text(yaml.safe_dump(config))
    return path


def crash_at_step(step: int):
    def on_train_batch_start(self, batch, batch_idx):
        if self.global_step == step:
            raise RuntimeError(f"simulated crash at step {step}")

    return on_train_batch_start


def test_resuming_with_ckpt_path_last_matches_an_uninterrupted_run(tiny_bert, tiny_csv, tmp_path, monkeypatch):
    """Interrupted at step 4 (mid-epoch 2; the last checkpoint is the end of epoch 1, step 3),
    then ``fit --ckpt_path last``: the same weights at step 6 as a run never interrupted,
    bit for bit, and the resumed run continues in the interrupted run's folder."""
    config = run_config(tiny_bert, tiny_csv, tmp_path / "distill.yaml")
    for folder in ("straight", "resumed"):
        (tmp_path / folder).mkdir()

    monkeypatch.chdir(tmp_path / "straight")
    main(["fit", "--config", str(config)])

    monkeypatch.chdir(tmp_path / "resumed")
    with monkeypatch.context() as crash:
        crash.setattr(DistillModule, "on_train_batch_start", crash_at_step(4), raising=False)
        with pytest.raises(RuntimeError, match="simulated crash at step 4"):
            main(["fit", "--config", str(config)])
    interrupted = torch.load("runs/kd_lightning/version_0/checkpoints/last.ckpt", weights_only=True)
    assert interrupted["global_step"] == 3
    cli = main(["fit", "--config", str(config), "--ckpt_path", "last"])
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO), "the CLI writes checkpoints atomically"
    assert any(isinstance(c, ResumableRNG) for c in cli.trainer.callbacks)

    assert sorted(os.listdir("runs/kd_lightning")) == ["version_0"], "resumed into the interrupted run's folder"
    straight = torch.load(tmp_path / "straight/runs/kd_lightning/version_0/checkpoints/last.ckpt", weights_only=True)
    resumed = torch.load("runs/kd_lightning/version_0/checkpoints/last.ckpt", weights_only=True)
    assert straight["global_step"] == resumed["global_step"] == 6
    for key, value in straight["state_dict"].items():
        assert torch.equal(resumed["state_dict"][key], value), key
    moments = zip(
        straight["optimizer_states"][0]["state"].values(), resumed["optimizer_states"][0]["state"].values(), strict=True
    )
    for a, b in moments:
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])


def test_ckpt_path_last_is_the_newest_run_with_a_last_checkpoint(tmp_path):
    from jsonargparse import Namespace

    def config(**logger_args):
        init_args = Namespace(save_dir=str(tmp_path / "runs"), name="distill", version=None, **logger_args)
        return Namespace(
            ckpt_path="last", trainer=Namespace(logger=Namespace(class_path="TensorBoardLogger", init_args=init_args))
        )

    fresh = config()
    resolve_last_checkpoint(fresh)
    assert fresh.ckpt_path == "last", "no run yet: left to Lightning, which starts from scratch"

    for version, mtime in (("version_0", 100), ("version_1", 300), ("version_2", 200)):
        folder = tmp_path / "runs" / "distill" / version / "checkpoints"
        folder.mkdir(parents=True)
        for name in ("last.ckpt", "best-step=3.ckpt"):
            (folder / name).write_bytes(b"")
            os.utime(folder / name, (mtime, mtime))
    (tmp_path / "runs/distill/version_2/checkpoints/.last.ckpt.123.abcd.tmp").write_bytes(b"")  # a crashed save
    resumed = config()
    resolve_last_checkpoint(resumed)
    assert resumed.ckpt_path == str(tmp_path / "runs/distill/version_1/checkpoints/last.ckpt")
    assert resumed.trainer.logger.init_args.version == "version_1"

    pinned = config()
    pinned.trainer.logger.init_args.version = "mine"
    resolve_last_checkpoint(pinned)
    assert pinned.ckpt_path == "last", "a fixed logger version is the user's choice"

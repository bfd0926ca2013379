"""Crash safety: a CLI fit killed with SIGKILL (once halfway through writing ``last.ckpt``) and
resumed with ``--ckpt_path last`` ends exactly as a run never killed; training loaders that
resume mid-epoch, in isolation.

The fits run through ``benchmarks/fault_tolerance.py`` (which also runs many random kill points):
``python -m kd_lightning fit`` in subprocesses that wait at their kill point until the test sends
SIGKILL. The comparison is exact: ``torch.equal`` on every weight, ``==`` on the metrics (one CPU
thread per run, seeded: nothing may differ in the last bit).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from types import ModuleType
from typing import Any

import pytest
import torch
from helpers import csv_datamodule, load_benchmark

from kd_lightning.checkpointing import newest_last_checkpoint, set_training_epoch
from kd_lightning.data import ResumableDataLoader, TextClassificationDataModule


@pytest.fixture(scope="module")
def fault_tolerance() -> ModuleType:
    """The benchmark script as a module (the killed runs import it as ``fault_tolerance``)."""
    return load_benchmark("fault_tolerance")


@pytest.fixture(scope="module")
def runs(fault_tolerance, tiny_bert, tiny_csv, tmp_path_factory) -> dict[str, Any]:
    """16 steps with length-grouped batches (12 an epoch), a checkpoint every 3 steps,
    validation every 4. Killed halfway through writing ``last.ckpt`` at step 9 (the previous
    one is step 6: mid-epoch), then before step 15 (the last is step 12, the end of epoch 0),
    resumed to the end; the uninterrupted reference runs beside it."""
    ft = fault_tolerance
    settings = ft.FitSettings(str(tiny_bert), tiny_csv, steps=16, save_every=3, val_every=4, group_by_length=True)
    reference_dir, killed_dir = tmp_path_factory.mktemp("reference"), tmp_path_factory.mktemp("killed")
    with pytest.MonkeyPatch.context() as env, ThreadPoolExecutor(1) as pool:
        env.setenv("KD_LIGHTNING_CACHE", str(tmp_path_factory.getbasetemp() / "kd_cache"))  # as tests/conftest.py
        reference = pool.submit(ft.reference_run, settings, reference_dir)
        killed = ft.FaultTolerance(killed_dir, ft.write_config(settings, killed_dir / "fit.yaml"), timeout_s=300)
        killed.run([ft.KillPoint("save", 9), ft.KillPoint("step", 14)])
        return {"reference": reference.result(), "killed": killed, "result": killed.result(), "dir": killed_dir}


def test_killed_twice_then_resumed_the_fit_ends_as_the_uninterrupted_run(runs, fault_tolerance):
    killed, result, reference = runs["killed"], runs["result"], runs["reference"]
    first, second, last = killed.invocations
    assert (first.killed, second.killed, last.killed) == (True, True, False)
    assert (first.steps_at_kill, second.steps_at_kill) == (9, 14)
    assert (first.last_checkpoint_step, second.last_checkpoint_step) == (6, 12)
    assert first.restored_from is None, "the first run started from scratch (--ckpt_path last, no checkpoint yet)"
    assert second.restored_from.endswith("version_0/checkpoints/last.ckpt") and last.restored_from == second.restored_from

    assert result["global_step"] == reference["global_step"] == 16
    assert set(result["state_dict"]) == set(reference["state_dict"])
    for key, value in reference["state_dict"].items():
        assert torch.equal(result["state_dict"][key], value), key
    assert result["last_validation"] == reference["last_validation"]
    comparison = fault_tolerance.compare(reference, result)
    assert comparison["identical"] and comparison["max_abs_weight_diff"] == 0.0

    # every validation, each as the last run to reach it logged it, matches; and training moved them
    assert result["validations"] == reference["validations"] and set(reference["validations"]) == {4, 8, 12, 16}
    assert reference["validations"][4]["val/loss"] != reference["validations"][16]["val/loss"]


def test_a_kill_while_saving_leaves_the_previous_last_checkpoint_loadable(runs):
    first = runs["killed"].invocations[0]
    assert first.kill == "save@9" and first.killed and first.returncode == -9
    assert first.last_checkpoint_error is None and first.last_checkpoint_step == 6
    [torn] = first.temporary_files  # the half-written temporary file of the atomic write ...
    checkpoints = runs["dir"] / "runs" / "fault_tolerance" / "version_0" / "checkpoints"
    assert (checkpoints / torn).stat().st_size < (checkpoints / "last.ckpt").stat().st_size
    with pytest.raises((RuntimeError, OSError)):
        torch.load(checkpoints / torn, weights_only=True)
    assert newest_last_checkpoint(runs["dir"] / "runs" / "fault_tolerance").name == "last.ckpt"  # ... never resumed from
    assert runs["killed"].invocations[1].restored_from is not None


# ---- resumable training loaders, in isolation -----------------------------------------------------
def epochs_of(loader: ResumableDataLoader, epochs: range) -> dict[int, list[list[int]]]:
    batches = {}
    for epoch in epochs:
        set_training_epoch(loader, epoch)
        batches[epoch] = [batch["index"].tolist() for batch in loader]
    return batches


@pytest.mark.parametrize(("group_by_length", "num_workers"), [(False, 0), (True, 0), (True, 2)])
def test_a_training_loader_restored_mid_epoch_reads_the_rest_of_the_epoch(tiny_bert, tiny_csv, group_by_length, num_workers):
    """The uninterrupted order of epochs 0-2, against a loader stopped after 5 batches of
    epoch 1 and a new data module + loader restored from the two states (made under another
    global seed: the checkpoint's seed wins), whose iterator is made before its epoch is set,
    as Lightning does on a resume."""

    def datamodule() -> TextClassificationDataModule:
        dm = csv_datamodule(tiny_csv, tokenizer=str(tiny_bert), group_by_length=group_by_length, length_group_size=2, num_workers=num_workers)
        dm.setup("fit")
        return dm

    torch.manual_seed(0)
    straight = epochs_of(datamodule().train_dataloader(), range(3))
    assert all(sorted(i for batch in straight[e] for i in batch) == list(range(96)) for e in straight)
    assert straight[0] != straight[1] != straight[2], "a new order every epoch"

    torch.manual_seed(0)
    interrupted_dm = datamodule()
    interrupted = interrupted_dm.train_dataloader()
    set_training_epoch(interrupted, 1)
    iterator = iter(interrupted)
    taken = [next(iterator)["index"].tolist() for _ in range(5)]
    assert taken == straight[1][:5]
    loader_state, data_state = interrupted.state_dict(), interrupted_dm.state_dict()
    assert loader_state == {"epoch": 1, "batches": 5} and data_state == {"training_order_seed": 0}

    torch.manual_seed(1234)
    resumed_dm = datamodule()
    resumed_dm.load_state_dict(data_state)
    resumed = resumed_dm.train_dataloader()
    resumed.load_state_dict(loader_state)
    iterator = iter(resumed)  # made before set_epoch, as Lightning makes it on a resume
    set_training_epoch(resumed, 1)
    rest = [batch["index"].tolist() for batch in iterator]
    assert rest == straight[1][5:]
    assert resumed.state_dict() == {"epoch": 1, "batches": len(straight[1])}
    assert epochs_of(resumed, range(2, 3))[2] == straight[2], "later epochs start at their first batch"

    fresh = datamodule()  # without a checkpoint, the order follows the global seed
    assert fresh.training_order_seed() == 1234


def test_a_resumable_loader_needs_a_resumable_batch_sampler():
    with pytest.raises(TypeError, match="ResumableBatchSampler"):
        iter(ResumableDataLoader(range(10), batch_size=2))

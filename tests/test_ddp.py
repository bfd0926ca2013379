"""DDP on CPU: two gloo processes train the student exactly as one process with the same global batch."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ddp_fit import build, fit

SCRIPT = Path(__file__).with_name("ddp_fit.py")
POISONED_EXAMPLE = 21  # its batch is skipped (NaN cross-entropy) on process 1 only under DDP


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without torch.distributed")
def test_two_processes_match_one_with_the_same_global_batch(tiny_bert, tiny_csv, tmp_path, monkeypatch):
    """2 x batch 8 under ``ddp`` vs 1 x batch 16, same row order (tests/ddp_fit.py), dropout off.

    Gradients are averaged over processes instead of over one batch, which changes only the
    summation order: the weights after one epoch (6 AdamW steps, lr 3e-3) agree to 1e-5 absolute
    (we measured 1.2e-7; a wrong row split or a skipped step applied on one side moves weights by
    ~lr = 3e-3), and the validation metrics, synced over the processes by torchmetrics and
    ``sync_dist``, to 1e-6. One step holds a NaN cross-entropy on one process only; both must
    skip it, as the single process does.
    """
    data_dir = str(Path(tiny_csv["train"]).parent)
    out = tmp_path / "ddp" / "result.pt"
    out.parent.mkdir()
    command = [sys.executable, str(SCRIPT), str(tiny_bert), data_dir, str(out), "--devices=2", "--batch-size=8"]
    ddp = subprocess.Popen(
        [*command, f"--poison={POISONED_EXAMPLE}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: the second rank goes with it on failure
    )
    try:
        monkeypatch.setenv("PL_GLOBAL_SEED", "0")  # restored after the test; fit() seeds it
        one = fit(str(tiny_bert), data_dir, str(tmp_path / "one"), devices=1, batch_size=16, poison=POISONED_EXAMPLE)
        log, _ = ddp.communicate(timeout=300)
    finally:
        if ddp.poll() is None:
            os.killpg(ddp.pid, signal.SIGKILL)
    assert ddp.returncode == 0, log.decode()[-5000:]
    two = torch.load(out)

    assert two["global_step"] == one["global_step"] == 6
    assert two["skipped_nonfinite"] == one["skipped_nonfinite"] == 1
    assert re.search(
        rf"at global step 1 \(process 1\): poisoned_cross_entropy=nan; .*\b{POISONED_EXAMPLE}\b", log.decode()
    )
    assert set(two["state_dict"]) == set(one["state_dict"])
    initial = build(str(tiny_bert), data_dir, 16, None)[0].state_dict()
    moved = max((one["state_dict"][k] - initial[k]).abs().max().item() for k in initial if k.startswith("student."))
    assert moved > 1e-3, "the student must train for the comparison to mean anything"
    for key, value in one["state_dict"].items():
        torch.testing.assert_close(two["state_dict"][key], value, rtol=0, atol=1e-5, msg=key)
    assert {"val/acc", "val/f1", "val/ece", "val/loss"} <= set(one["metrics"])
    assert two["metrics"] == pytest.approx(one["metrics"], abs=1e-6)

"""Kill a distillation fit with SIGKILL at random points, resume it, and compare with a run never killed.

    python benchmarks/fault_tolerance.py --kills 20            # 20 trials, seed 0
    python benchmarks/fault_tolerance.py --kills 10 --seed 1   # other kill points

Every run is ``python -m kd_lightning fit --config <yaml> --ckpt_path last`` in a subprocess of
its own, as a user would run it again and again on a machine that dies: a tiny BERT teacher and
a 1-layer student with dropout (CE + KD + a learned projection of features, AdamW with a
warm-up/linear schedule), 96 synthetic training rows in batches of 8 (12 batches an epoch),
``--steps`` optimiser steps, a checkpoint (and ``last.ckpt``) every ``--save-every`` steps,
validation every ``--val-every`` steps, seeded, on the CPU with one thread. Trials alternate
between the length-grouped batches (``group_by_length``) and plain shuffled batches, each
compared with its own uninterrupted reference run.

A trial kills a run at one to three points, one after another; after each kill the next run
resumes from ``last.ckpt``, and runs are started until one finishes. Kill points (seeded):

    step        before the optimiser step after ``at`` steps (the batch already drawn)
    optimizer   after the forward and backward passes of step ``at + 1``, before the update
    validation  during the validation that follows step ``at``
    save        halfway through writing ``last.ckpt`` at step ``at`` (the atomic write's
                temporary file is half written; the previous ``last.ckpt`` must survive)
    time        ``at`` seconds after the run's first training step finished, wherever it then
                is (a step, a save, validation, the end of training)

The run waits at a kill point (this module's :class:`FaultInjection` callback and
:class:`PausingCheckpointIO`, named in the config) until the benchmark sends SIGKILL to its
process group. A trial is identical when the finished student (and the loss-owned projection)
is bit for bit the reference's, and the last validation's metrics are equal.

Writes ``benchmarks/results/fault_tolerance.{json,md}`` (``--out``).
"""

from __future__ import annotations

import argparse
import importlib
import io
import json
import os
import platform
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any
from unittest import mock

import lightning.pytorch as pl
import torch
import yaml

from kd_lightning.checkpointing import AtomicCheckpointIO, newest_last_checkpoint

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
KILL_ENV = "KD_FAULT_KILL"  # "kind:at" of the kill point a run stops at
FOLDER_ENV = "KD_FAULT_DIR"  # where a run writes its progress, its pause marker and its final state
RUN_NAME = "fault_tolerance"  # the logger's name: runs/<RUN_NAME>/version_N
KINDS = ("step", "optimizer", "validation", "save", "time")
PAUSE_LIMIT_S = 600  # a paused run nobody kills exits by itself after this long


# ---- inside the killed runs ---------------------------------------------------------------------
@dataclass(frozen=True)
class KillPoint:
    """Where a run is killed: ``kind`` (one of :data:`KINDS`) and ``at``, the global step (for
    ``time``: seconds after the run's first training step finished)."""

    kind: str
    at: float

    def __str__(self) -> str:
        return f"{self.kind}@{self.at:.2f}s" if self.kind == "time" else f"{self.kind}@{int(self.at)}"

    @classmethod
    def parse(cls, text: str) -> KillPoint:
        kind, at = text.split(":")
        if kind not in KINDS:
            raise ValueError(f"unknown kill point {kind!r}; one of {KINDS}")
        return cls(kind, float(at))


def planned_kill() -> KillPoint | None:
    """This run's kill point (``$KD_FAULT_KILL``), or None."""
    text = os.environ.get(KILL_ENV)
    return KillPoint.parse(text) if text else None


def fault_folder() -> Path | None:
    """Where this run reports (``$KD_FAULT_DIR``), or None."""
    folder = os.environ.get(FOLDER_ENV)
    return Path(folder) if folder else None


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """``write`` a temporary file beside ``path``, then rename it over ``path``."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(temporary)
    os.replace(temporary, path)


def write_json(path: Path, value: Any) -> None:
    write_atomically(path, lambda p: p.write_text(json.dumps(value)))


def pause_for_kill(kind: str, global_step: int) -> None:
    """Say where this run stands (``paused.json``) and wait to be killed."""
    folder = fault_folder()
    if folder is None:
        raise RuntimeError(f"a kill point is set ({KILL_ENV}) but not {FOLDER_ENV}")
    write_json(folder / "paused.json", {"kind": kind, "global_step": global_step, "pid": os.getpid()})
    time.sleep(PAUSE_LIMIT_S)
    os._exit(3)  # nobody came: leave as a killed run would, without cleaning up


class FaultInjection(pl.Callback):
    """Pauses the run at its ``step``/``optimizer``/``validation`` kill point, and records for
    the benchmark (in ``$KD_FAULT_DIR``): the steps done (``progress.json``), every
    validation's metrics (``validations.jsonl``) and, when training ends, the trained
    weights (``final.pt``). Draws no random numbers and has no state: runs with and without
    it train alike."""

    def __init__(self) -> None:
        self.kill = planned_kill()
        self.folder = fault_folder()

    def _due(self, kind: str, trainer: pl.Trainer) -> bool:
        return self.kill is not None and self.kill.kind == kind and trainer.global_step == int(self.kill.at)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._due("step", trainer):
            pause_for_kill("step", trainer.global_step)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if self._due("optimizer", trainer):
            pause_for_kill("optimizer", trainer.global_step)

    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if not trainer.sanity_checking and self._due("validation", trainer):
            pause_for_kill("validation", trainer.global_step)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if self.folder is not None:
            write_json(self.folder / "progress.json", {"global_step": trainer.global_step})

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.folder is None or trainer.sanity_checking:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        with open(self.folder / "validations.jsonl", "a") as handle:
            handle.write(json.dumps({"global_step": trainer.global_step, "metrics": metrics}) + "\n")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.folder is None:
            return
        state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        final = {"global_step": trainer.global_step, "state_dict": state}
        write_atomically(self.folder / "final.pt", lambda p: torch.save(final, p))


class PausingCheckpointIO(AtomicCheckpointIO):
    """:class:`AtomicCheckpointIO` that, at a ``save`` kill point, writes half of
    ``last.ckpt``'s bytes into the temporary file and waits there to be killed."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None) -> None:
        kill = planned_kill()
        due = kill is not None and kill.kind == "save" and checkpoint.get("global_step") == int(kill.at)
        if not due or not Path(path).name.startswith("last"):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        whole = io.BytesIO()
        torch.save(checkpoint, whole)

        def write_half_then_pause(obj: Any, handle: Any, *args: Any, **kwargs: Any) -> None:
            handle.write(whole.getvalue()[: len(whole.getvalue()) // 2])
            handle.flush()
            pause_for_kill("save", int(checkpoint["global_step"]))

        with mock.patch.object(torch, "save", write_half_then_pause):
            super().save_checkpoint(checkpoint, path, storage_options)


# ---- the runs -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class FitSettings:
    """One fit: its teacher and data, length and checkpoint/validation cadence, batch order."""

    teacher: str
    data_files: dict[str, str]
    steps: int = 20
    save_every: int = 3
    val_every: int = 4
    group_by_length: bool = True


def write_config(settings: FitSettings, path: Path) -> Path:
    """The fit's YAML: see the module docstring; the fault-injection hooks are in every run."""
    model = tests_module("helpers").distill_model_config(settings.teacher)
    data = {
        "class_path": "kd_lightning.data.TextClassificationDataModule",
        "init_args": {
            "data_files": settings.data_files,
            "max_length": 16,
            "batch_size": 8,
            "group_by_length": settings.group_by_length,
            "length_group_size": 3,
        },
    }
    checkpoints = {
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        "init_args": {"every_n_train_steps": settings.save_every, "save_last": True},
    }
    trainer = {
        "max_steps": settings.steps,
        "val_check_interval": settings.val_every,
        "log_every_n_steps": 1,
        "logger": {
            "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
            "init_args": {"save_dir": "runs", "name": RUN_NAME},
        },
        "callbacks": [checkpoints, {"class_path": "fault_tolerance.FaultInjection"}],
        "plugins": [{"class_path": "fault_tolerance.PausingCheckpointIO"}],
    }
    config = {"seed_everything": 0, "model": model, "data": data, "trainer": trainer}
    path.write_text(yaml.safe_dump(config))
    return path


@dataclass
class Invocation:
    """One ``fit`` process: where it was to be killed, and what was found after."""

    kill: str | None
    killed: bool
    returncode: int
    seconds: float
    restored_from: str | None = None  # the checkpoint it resumed from (None: started from scratch)
    first_step_s: float | None = None  # seconds from the start to its first finished training step
    last_step_s: float | None = None  # ... to its last one
    steps_at_kill: int | None = None  # global step when killed
    last_checkpoint_step: int | None = None  # global step of last.ckpt after the kill (None: none yet)
    last_checkpoint_error: str | None = None  # why last.ckpt did not load, if it did not
    temporary_files: list[str] = field(default_factory=list)  # atomic-write leftovers after the kill


class FaultTolerance:
    """Runs fits in ``workdir`` (one trial's folder) and kills them at their kill points.

    Args:
        workdir: the runs' working directory (``runs/`` and the reports go there).
        config: the fit's YAML.
        timeout_s: the longest one process may run.
    """

    def __init__(self, workdir: Path, config: Path, timeout_s: float = 600) -> None:
        self.workdir = workdir
        self.config = config
        self.timeout_s = timeout_s
        self.folder = workdir / "fault"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.invocations: list[Invocation] = []

    def environment(self, kill: KillPoint | None) -> dict[str, str]:
        env = dict(os.environ)
        env.update({FOLDER_ENV: str(self.folder), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE), env.get("PYTHONPATH")) if p)
        env.pop(KILL_ENV, None)
        if kill is not None and kill.kind != "time":
            env[KILL_ENV] = f"{kill.kind}:{int(kill.at)}"
        return env

    def fit(self, kill: KillPoint | None = None, resume: bool = True) -> Invocation:
        """One ``fit`` (``--ckpt_path last`` when ``resume``), killed at ``kill`` if it gets there."""
        marker = self.folder / "paused.json"
        marker.unlink(missing_ok=True)
        command = [sys.executable, "-m", "kd_lightning", "fit", "--config", str(self.config)]
        command += ["--ckpt_path", "last"] if resume else []
        start = time.monotonic()
        with open(self.log_path(len(self.invocations)), "wb") as log:
            log.write(f"{' '.join(command)} (kill: {kill})\n".encode())
            log.flush()
            process = subprocess.Popen(
                command, cwd=self.workdir, env=self.environment(kill), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
            try:
                paused, steps_s = self._wait_for_kill_point(process, kill, marker, start)
            finally:
                if process.poll() is None:
                    os.killpg(process.pid, signal.SIGKILL)
                returncode = process.wait()
        seconds = time.monotonic() - start
        killed = returncode == -signal.SIGKILL
        if returncode != 0 and not killed:
            raise RuntimeError(f"fit failed with exit code {returncode}:\n{self.log_tail()}")
        output = self.log_path(len(self.invocations)).read_text(errors="replace")
        restored = re.search(r"Restored all states from the checkpoint at (\S+)", output)
        invocation = Invocation(str(kill) if kill else None, killed, returncode, seconds, restored and restored[1], *steps_s)
        if killed:
            invocation.steps_at_kill = paused["global_step"] if paused else self.steps_done()
            invocation.temporary_files = sorted(p.name for p in self.workdir.glob("runs/*/version_*/checkpoints/.*.tmp"))
            invocation.last_checkpoint_step, invocation.last_checkpoint_error = self.last_checkpoint_step()
        self.invocations.append(invocation)
        return invocation

    def _wait_for_kill_point(
        self, process: subprocess.Popen, kill: KillPoint | None, marker: Path, start: float
    ) -> tuple[dict[str, Any] | None, tuple[float | None, float | None]]:
        """Wait for the process to end or reach its kill point; SIGKILL it there. The pause
        marker's content (when it paused), and when its first and last training steps finished
        (seconds since ``start``, as far as seen)."""
        progress, started = self.folder / "progress.json", time.time()
        first_step_s = last_step_s = None
        seen = started
        while process.poll() is None:
            elapsed = time.monotonic() - start
            if elapsed > self.timeout_s:
                raise TimeoutError(f"fit ran for more than {self.timeout_s} s:\n{self.log_tail()}")
            modified = progress.stat().st_mtime if progress.exists() else started
            if modified > seen:
                seen, last_step_s = modified, elapsed
                first_step_s = elapsed if first_step_s is None else first_step_s
            paused = json.loads(marker.read_text()) if marker.exists() else None
            timed_out = kill is not None and kill.kind == "time" and first_step_s is not None and elapsed >= first_step_s + kill.at
            if paused is not None or timed_out:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                return paused, (first_step_s, last_step_s)
            time.sleep(0.02)
        return None, (first_step_s, last_step_s)

    def steps_done(self) -> int:
        """The global step of the last finished training batch, from ``progress.json``."""
        progress = self.folder / "progress.json"
        return int(json.loads(progress.read_text())["global_step"]) if progress.exists() else 0

    def last_checkpoint_step(self) -> tuple[int | None, str | None]:
        """The global step in the newest ``last.ckpt`` (None: no checkpoint yet), or why it did not load."""
        path = newest_last_checkpoint(self.workdir / "runs" / RUN_NAME)
        if path is None:
            return None, None
        try:
            return int(torch.load(path, weights_only=True, map_location="cpu")["global_step"]), None
        except Exception as err:  # a torn checkpoint: exactly what this benchmark looks for
            return None, f"{type(err).__name__}: {err}"

    def finished(self) -> bool:
        return (self.folder / "final.pt").exists()

    def run(self, kills: list[KillPoint], max_runs: int | None = None) -> None:
        """Kill a run at each of ``kills`` in turn, then resume until a run finishes."""
        for kill in kills:
            if self.finished():
                break
            self.fit(kill)
        limit = max_runs or len(kills) + 3
        while not self.finished():
            if len(self.invocations) >= limit:
                raise RuntimeError(f"no run finished after {limit} runs:\n{self.log_tail()}")
            self.fit()

    def validations(self) -> dict[int, dict[str, float]]:
        """Validation metrics by global step, as the last run that validated at that step logged them."""
        by_step = {}
        for line in (self.folder / "validations.jsonl").read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # cut short by a kill
                continue
            by_step[record["global_step"]] = record["metrics"]
        return by_step

    def result(self) -> dict[str, Any]:
        """The finished run's weights, and the metrics of every validation (the last one apart)."""
        final = torch.load(self.folder / "final.pt", weights_only=True)
        validations = self.validations()
        last = max(validations)
        return {
            "global_step": final["global_step"],
            "state_dict": final["state_dict"],
            "validations": validations,
            "last_validation": {"global_step": last, "metrics": validations[last]},
        }

    def log_path(self, index: int) -> Path:
        """The output of the ``index``-th fit."""
        return self.folder / f"fit_{index}.log"

    def log_tail(self, chars: int = 4000) -> str:
        """The end of the latest fit's output."""
        logs = [self.log_path(i) for i in range(len(self.invocations) + 1) if self.log_path(i).exists()]
        return logs[-1].read_text(errors="replace")[-chars:] if logs else ""


def reference_run(settings: FitSettings, workdir: Path) -> dict[str, Any]:
    """The uninterrupted run (no ``--ckpt_path``): its result and wall time."""
    harness = FaultTolerance(workdir, write_config(settings, workdir / "fit.yaml"))
    invocation = harness.fit(resume=False)
    training_s = (invocation.last_step_s or 0.0) - (invocation.first_step_s or 0.0)
    return {**harness.result(), "seconds": invocation.seconds, "training_s": training_s}


def compare(reference: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    """Bit-identical weights and equal final validation metrics, and the largest weight difference."""
    ref, got = reference["state_dict"], result["state_dict"]
    if set(ref) != set(got):
        raise ValueError(f"different weights: {sorted(set(ref) ^ set(got))}")
    max_diff = max(float((got[k].double() - ref[k].double()).abs().max()) if ref[k].numel() else 0.0 for k in ref)
    weights_equal = all(torch.equal(got[k], ref[k]) for k in ref)
    validation_equal = result["last_validation"] == reference["last_validation"]
    return {
        "identical": weights_equal and validation_equal and result["global_step"] == reference["global_step"],
        "weights_equal": weights_equal,
        "validation_equal": validation_equal,
        "max_abs_weight_diff": max_diff,
        "final_validation": result["last_validation"],
    }


def trial(settings: FitSettings, workdir: Path, kills: list[KillPoint], reference: dict[str, Any]) -> dict[str, Any]:
    """Kill runs at ``kills``, resume to the end, compare with ``reference``."""
    harness = FaultTolerance(workdir, write_config(settings, workdir / "fit.yaml"))
    harness.run(kills)
    return {
        "kills": [str(k) for k in kills],
        "group_by_length": settings.group_by_length,
        "invocations": [asdict(i) for i in harness.invocations],
        "resumes": len(harness.invocations) - 1,
        **compare(reference, harness.result()),
    }


# ---- the benchmark ------------------------------------------------------------------------------
def plan(trials: int, seed: int, settings: FitSettings, training_s: float) -> list[list[KillPoint]]:
    """Seeded kill points: each trial's first kind cycles through :data:`KINDS`; one or two
    more pause points may follow, at later steps. ``time`` kills stand alone, uniform over
    the ``training_s`` seconds from the reference run's first finished step to its last."""
    rng = random.Random(seed)
    steps = {
        "step": list(range(0, settings.steps)),
        "optimizer": list(range(0, settings.steps)),
        "validation": list(range(settings.val_every, settings.steps + 1, settings.val_every)),
        "save": list(range(settings.save_every, settings.steps + 1, settings.save_every)),
    }
    plans = []
    for index in range(trials):
        first = KINDS[index % len(KINDS)]
        if first == "time":
            plans.append([KillPoint("time", round(rng.uniform(0.0, training_s), 2))])
            continue
        kills = [KillPoint(first, rng.choice(steps[first][: max(1, len(steps[first]) // 2)]))]
        for _ in range(rng.randint(0, 2)):
            kind = rng.choice(list(steps))
            later = [s for s in steps[kind] if s > kills[-1].at]
            if later:
                kills.append(KillPoint(kind, rng.choice(later)))
        plans.append(kills)
    return plans


def tests_module(name: str) -> ModuleType:
    """A module of the test suite's (``tests/conftest.py``, ``tests/helpers.py``): the tiny
    teacher, data and model of the tests are this benchmark's."""
    tests = str(HERE.parent / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    return importlib.import_module(name)


def tiny_setup(root: Path) -> tuple[str, dict[str, str]]:
    """The tests' tiny BERT teacher and synthetic sentiment CSVs, written under ``root``."""
    import pandas as pd

    conftest = tests_module("conftest")
    teacher = conftest.write_tiny_bert(root / "teacher")
    files = {}
    for split, rows, seed in (("train", 96, 0), ("validation", 32, 1), ("test", 32, 2)):
        files[split] = str(root / f"{split}.csv")
        pd.DataFrame(conftest.sentiment_rows(rows, seed)).to_csv(files[split], index=False)
    return str(teacher), files


def benchmark(args: argparse.Namespace, log: Callable[[str], None] = print) -> dict[str, Any]:
    started, load_before = time.monotonic(), os.getloadavg()
    root = Path(args.work_dir or tempfile.mkdtemp(prefix="kd_fault_tolerance_"))
    root.mkdir(parents=True, exist_ok=True)
    teacher, files = tiny_setup(root / "inputs")
    variants = {
        grouped: FitSettings(teacher, files, args.steps, args.save_every, args.val_every, group_by_length=grouped)
        for grouped in (True, False)
    }
    references = {}
    for grouped, settings in variants.items():
        workdir = root / f"reference_{'grouped' if grouped else 'plain'}"
        workdir.mkdir()
        references[grouped] = reference_run(settings, workdir)
        log(f"reference ({'grouped' if grouped else 'plain'} batches): {references[grouped]['seconds']:.1f} s")
    training_s = min(r["training_s"] for r in references.values())
    rows = []
    for index, kills in enumerate(plan(args.kills, args.seed, variants[True], training_s)):
        grouped = index % 2 == 0
        workdir = root / f"trial_{index:03d}"
        workdir.mkdir()
        row = {"trial": index, **trial(variants[grouped], workdir, kills, references[grouped])}
        rows.append(row)
        log(table_row(row))
    identical = sum(r["identical"] for r in rows)
    return {
        "command": f"python {' '.join(sys.orig_argv[1:])}",
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "work_dir")},
        "reference_seconds": {("grouped" if g else "plain"): r["seconds"] for g, r in references.items()},
        "reference_training_seconds": {("grouped" if g else "plain"): r["training_s"] for g, r in references.items()},
        "reference_final_validation": {("grouped" if g else "plain"): r["last_validation"] for g, r in references.items()},
        "trials": rows,
        "summary": {
            "trials": len(rows),
            "identical": identical,
            "kills": sum(i["killed"] for r in rows for i in r["invocations"]),
            "kills_by_kind": {kind: sum(k.startswith(kind) for r in rows for k in r["kills"]) for kind in KINDS},
            "kills_during_save": sum(i["killed"] and i["kill"].startswith("save") for r in rows for i in r["invocations"]),
            "runs": sum(len(r["invocations"]) for r in rows),
            "max_abs_weight_diff": max((r["max_abs_weight_diff"] for r in rows), default=0.0),
            "seconds": round(time.monotonic() - started, 1),
        },
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "lightning": pl.__version__,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
            "load_average_1_5_15_min": {"start": load_before, "end": os.getloadavg()},
        },
    }


TABLE_HEADER = (
    "| trial | batches | kill points | steps done at kill | last.ckpt step after kill | runs killed | resumes | identical | max abs weight diff |\n"
    "|---|---|---|---|---|---|---|---|---|"
)


def table_row(row: dict[str, Any]) -> str:
    killed = [i for i in row["invocations"] if i["killed"]]
    last = ["none" if i["last_checkpoint_step"] is None else str(i["last_checkpoint_step"]) for i in killed]
    return (
        f"| {row['trial']} | {'grouped' if row['group_by_length'] else 'plain'} | {', '.join(row['kills'])} "
        f"| {', '.join(str(i['steps_at_kill']) for i in killed) or '-'} | {', '.join(last) or '-'} "
        f"| {len(killed)}/{len(row['kills'])} | {row['resumes']} | {'yes' if row['identical'] else 'NO'} "
        f"| {row['max_abs_weight_diff']:.3g} |"
    )


def report(result: dict[str, Any]) -> str:
    summary = result["summary"]
    lines = [
        "# Kill and resume: exact continuation after SIGKILL",
        "",
        f"Command: `{result['command']}` ({result['environment']['machine']}, torch {result['environment']['torch']}, "
        f"lightning {result['environment']['lightning']}; load average {result['environment']['load_average_1_5_15_min']['start'][0]:.1f} "
        f"at the start, {result['environment']['load_average_1_5_15_min']['end'][0]:.1f} at the end: the machine was shared).",
        "",
        f"**{summary['identical']} of {summary['trials']} trials identical** to the uninterrupted run "
        f"(student weights bit for bit, final validation metrics equal); {summary['kills']} SIGKILLs, "
        f"{summary['kills_during_save']} of them halfway through writing `last.ckpt`; {summary['runs']} runs in all; "
        f"largest weight difference {summary['max_abs_weight_diff']:.3g}. Kill points planned, by kind: "
        + ", ".join(f"{k} {n}" for k, n in summary["kills_by_kind"].items())
        + f". Wall time {summary['seconds'] / 60:.1f} min; an uninterrupted run takes "
        + ", ".join(f"{s:.1f} s ({k})" for k, s in result["reference_seconds"].items())
        + ".",
        "",
        "Steps done at kill: the optimiser steps finished when the process was killed. last.ckpt step after "
        "kill: the step of the newest `last.ckpt` right after the kill (loaded with `torch.load`), which the "
        "next run resumes from (`none`: none written yet, the next run starts from scratch). Runs killed: "
        "kill points reached (a `time` kill after the run ended kills nothing). Resumes: runs with "
        "`--ckpt_path last` after the first.",
        "",
        TABLE_HEADER,
        *(table_row(row) for row in result["trials"]),
        "",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=20, help="number of kill-and-resume trials")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill points")
    parser.add_argument("--steps", type=int, default=20, help="optimiser steps of a fit")
    parser.add_argument("--save-every", type=int, default=3, help="steps between checkpoints")
    parser.add_argument("--val-every", type=int, default=4, help="steps between validations")
    parser.add_argument("--work-dir", help="folder for the runs (default: a new temporary folder)")
    parser.add_argument("--out", type=Path, default=RESULTS / "fault_tolerance", help="report path without suffix")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    print(TABLE_HEADER)
    result = benchmark(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    args.out.with_suffix(".md").write_text(report(result))
    print(report(result))
    return result


if __name__ == "__main__":
    main()

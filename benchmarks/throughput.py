"""Throughput of a distillation training step: kd_lightning against a hand-written loop, TextBrewer
and torchdistill, with the live teacher and with the on-disk teacher cache.

    python benchmarks/throughput.py            # 5 warm-up steps, 5 repeats of 20 steps (about 30 min on 2 busy cores)
    python benchmarks/throughput.py --quick    # 2 warm-up steps, 3 repeats of 5 steps, 1,024 training rows (about 5 min)

On a CUDA GPU (every contender's models, batches and losses on the GPU), with a teacher folder and
the materialised split files (``train``/``validation``/``test`` ``.parquet`` or ``.csv``) instead of
the packaged data set:

    python benchmarks/throughput.py --device cuda --teacher /tmp/teacher --data-files .gpu_assets/rt
    python benchmarks/throughput.py --device cuda --precision bf16-mixed --teacher /tmp/teacher --data-files .gpu_assets/rt

Every contender does the same work: the packaged Rotten Tomatoes training split (batch 32, length
64, the same seeded order of full batches), the all-MiniLM-L6-v2 teacher (the fine-tuned
``runs/quickstart/teacher`` when present), a 2-layer student copied from the teacher's layers 0 and
5, the objective ``0.5 CE + 0.5 T^2 KL(p_t || p_s)`` with ``T = 2``, AdamW (lr 1e-4, weight decay
0.01) with a constant LambdaLR schedule, float32, ``torch.set_num_threads(2)``, on the CPU.
``--device cuda`` and ``--precision bf16-mixed`` change this for every contender alike; a setting a
contender cannot honour is refused, never measured as something else. Without ``--contenders``, a
contender whose library does not import (TextBrewer, torchdistill) is skipped and the report says so;
named explicitly, it is an error.

    a lightning_live     kd_lightning.DistillModule (live teacher), trained by lightning.Trainer
    b hand_live          a minimal hand-written PyTorch loop: teacher under no_grad, student, CE + KD,
                         backward, AdamW step, scheduler step, zero_grad
    b' hand_live_copy    a second, identical copy of b: the A/A control, whose ratio to b shows how
                         far two identical contenders drift apart in this run (the resolution)
    c lightning_cache    DistillModule reading the teacher's logits from its TeacherCache (built first)
    d lightning_student  kd_lightning.FineTuneModule: the same student on CE alone (no teacher, no KD)
    e textbrewer_live    textbrewer.GeneralDistiller.train(num_steps=...) with logit/loss adaptors
    f torchdistill_live  torchdistill's DistillationBox (KDLoss on forward-hooked classifier outputs),
                         driven by the per-batch loop of torchdistill's examples
    g lightning_minimal  the hand loop's work (b) as a bare LightningModule with no logging, trained by
                         lightning.Trainer: Lightning's own floor, so a/b splits into a/g (kd_lightning's
                         overhead over Lightning) and g/b (Lightning's over a plain loop)
    h lightning_live_graphs
                         a with ``teacher_cuda_graphs``: the frozen teacher's forward pass replayed from
                         CUDA graphs, one per padded length (captured as new lengths appear, inside the
                         timed steps); ``--device cuda`` only

Method. Each contender's own training loop runs in its own thread and pauses at the same point of
every step, right after the batch is fetched (Lightning: ``on_train_batch_start``; TextBrewer: its
``batch_postprocessor``; the loops: after ``next(loader)``). The main thread lets one contender at a
time run one step, then the next, in rounds of one step each, in a new seeded random order every
round: contenders alternate step by step, so a slow spell of the shared machine hits all of them
alike, and no contender always follows the same one. Each timed
step is exactly one full iteration (fetch, forward, loss, backward, optimiser, framework
bookkeeping), from the tick that resumes the loop to the tick that pauses it. A repeat is
``--steps`` rounds; a contender's samples/s in a repeat = steps x batch / the sum of its step
times. Set-up (model loading, ``Trainer.fit`` set-up, the cache build) and the warm-up steps are
outside the timing. Ratios are taken per repeat, and the median over repeats is reported. On CUDA
the pause point calls ``torch.cuda.synchronize()`` before reading the clock, both when a step ends
and when the next one starts, so each step's time includes its kernels.

Devices and precision. Lightning: ``Trainer(accelerator="gpu" | "cpu", precision="32-true" |
"bf16-mixed")``. The hand loops and torchdistill: models ``.to(device)``, batches copied with
``non_blocking=True`` (the shared loader pins its batches on CUDA), the forward passes under
``torch.autocast(device, dtype=torch.bfloat16)`` for bf16-mixed and the loss on float32 logits, as
kd_lightning's losses. TextBrewer: ``TrainingConfig(device=...)`` copies the batches; its
``train_on_batch`` (forwards and losses) runs under the same autocast, since its own mixed precision
is apex float16 only. Backward and optimiser steps run outside autocast everywhere.

Checks, asserted: all contenders see the same batches in the same order; every student parameter
tensor changes; the Lightning runs made exactly the requested optimiser steps; the objectives agree
(values and gradients on the same logits; TextBrewer's soft cross-entropy differs from KL by the
teacher's entropy, a constant, and its ``kd_loss_weight`` is ``0.5 T^2`` since it does not scale by
``T^2``).

Memory: peak resident set size (``VmHWM`` of ``/proc/self/status``; ``ru_maxrss`` would carry the
parent's peak into the child on Linux) of a fresh subprocess per contender that builds it, runs its
set-up and ``--memory-steps`` steps; ``baseline`` is a process that only imports what every probe
imports and prepares the data. On CUDA the probes also report ``torch.cuda.max_memory_allocated``
(reset after the data are prepared), and the report's peak column is that figure.

Writes ``benchmarks/results/throughput.{md,json}`` (``--out-dir``).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import dataclasses
import io
import json
import logging
import math
import os
import platform
import pstats
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")  # TextBrewer's loop would otherwise draw a progress bar on a terminal

import torch  # noqa: E402


def ensure_torchvision_importable() -> None:
    """Let a torchvision whose C++ ops cannot load still be imported (torchdistill imports it).

    PyPI's torchvision 0.28.0 is a CUDA build (``0.28.0+cu130``). With the CPU torch its ``_C``
    library does not load, and ``import torchvision`` then fails registering fake kernels for
    ``torchvision::nms`` and ``torchvision::qnms`` -- and so does anything that imports it, such as
    ``from transformers import BertModel``. Declaring those two schemas first lets the import
    finish; no torchvision op is used here. Does nothing when torchvision is absent or its ops load.
    Must run before transformers or torchdistill import torchvision.
    """
    import importlib.util

    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return
    try:
        for library in sorted(Path(spec.submodule_search_locations[0]).glob("_C*.so")):
            torch.ops.load_library(str(library))
    except OSError:
        for op in ("nms", "qnms"):
            try:
                torch.library.define(f"torchvision::{op}", "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            except RuntimeError:
                pass  # already declared


ensure_torchvision_importable()

import lightning.pytorch as pl  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from transformers import DataCollatorWithPadding, PreTrainedModel  # noqa: E402

from kd_lightning import DistillModule, FineTuneModule, StudentSpec, TeacherSpec  # noqa: E402
from kd_lightning.cuda_graphs import CudaGraphConfig  # noqa: E402
from kd_lightning.data import TextClassificationDataModule  # noqa: E402
from kd_lightning.losses import CrossEntropy, DistillLoss, KLDivergence  # noqa: E402
from kd_lightning.models import build_student, freeze, load_classifier  # noqa: E402
from kd_lightning.outputs import ModelOutputs  # noqa: E402
from kd_lightning.teacher_cache import TeacherCacheConfig  # noqa: E402
from kd_lightning.training import OptimConfig, lr_multiplier, model_inputs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
QUICKSTART_TEACHER = "runs/quickstart/teacher"
PACKAGED_TEACHER = "all-MiniLM-L6-v2"
MEMORY_PROBE_TAG = "MEMORY_PROBE "
DEVICES = ("cpu", "cuda")
#: ``--precision`` -> (Lightning's ``precision``, how the report describes it)
PRECISIONS = {
    "32": ("32-true", "float32"),
    "bf16-mixed": ("bf16-mixed", "bf16-mixed (bfloat16 autocast of the forward passes; float32 weights, losses and optimiser)"),
}
DATA_SPLITS = ("train", "validation", "test")
DATA_FILE_TYPES = (".parquet", ".csv")


# ---- configuration -------------------------------------------------------------------------------
@dataclasses.dataclass
class BenchConfig:
    """What every contender trains on, and how long each is timed.

    Args:
        teacher: teacher folder or packaged key; default: ``runs/quickstart/teacher`` when it
            exists, else the packaged all-MiniLM-L6-v2 with a fresh 2-label head.
        dataset / data_files: the training data (a packaged set, or local files split -> path).
        student_layers: teacher layers copied into the student.
        warmup_steps / steps / repeats: untimed steps per contender, then ``repeats`` repeats
            of ``steps`` rounds, each round one timed step of every contender.
        memory_steps: steps run by each memory probe (0: no memory probes).
        cache_root: folder of the teacher cache (default: the project cache).
        contenders: which contenders run (and their order in the report); ``None``: every
            contender whose library imports (see :func:`resolve_contenders`).
        device: ``cpu`` or ``cuda``, for every contender.
        precision: ``32`` or ``bf16-mixed`` (bfloat16 autocast), for every contender.
    """

    teacher: str | None = None
    dataset: str | None = "packaged/rotten_tomatoes"
    data_files: dict[str, str] | None = None
    max_length: int = 64
    batch_size: int = 32
    max_train_samples: int | None = None
    num_labels: int = 2
    student_layers: list[int] = dataclasses.field(default_factory=lambda: [0, 5])
    temperature: float = 2.0
    ce_weight: float = 0.5
    kd_weight: float = 0.5
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_steps: int = 5
    steps: int = 20
    repeats: int = 5
    memory_steps: int = 3
    threads: int = 2
    seed: int = 0
    cache_root: str | None = None
    contenders: list[str] | None = None
    device: str = "cpu"
    precision: str = "32"

    @property
    def timed_steps(self) -> int:
        """Steps a contender runs in the whole benchmark (its loop stops at the next batch)."""
        return self.warmup_steps + self.repeats * self.steps

    def optim(self) -> OptimConfig:
        """kd_lightning's optimiser settings for the same AdamW and constant schedule."""
        return OptimConfig(lr=self.lr, weight_decay=self.weight_decay, warmup_ratio=0.0, schedule="constant")

    def autocast(self) -> contextlib.AbstractContextManager:
        """The forward passes' precision outside Lightning: bfloat16 autocast on the benchmark's
        device for ``bf16-mixed``, nothing for ``32``."""
        if self.precision == "bf16-mixed":
            return torch.autocast(self.device, dtype=torch.bfloat16)
        return contextlib.nullcontext()


def check_config(config: BenchConfig) -> None:
    """Refuse a device or precision that the machine cannot run for every contender."""
    if config.device not in DEVICES:
        raise ValueError(f"--device {config.device}: choose one of {', '.join(DEVICES)}")
    if config.precision not in PRECISIONS:
        raise ValueError(f"--precision {config.precision}: choose one of {', '.join(PRECISIONS)}")
    if config.device == "cuda" and not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "a CPU-only build"
        raise ValueError(f"--device cuda: torch {torch.__version__} ({build}) sees no CUDA device; run with --device cpu")
    if config.device == "cuda" and config.precision == "bf16-mixed" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"--precision bf16-mixed: {torch.cuda.get_device_name()} has no bfloat16 support; use --precision 32")


def resolve_teacher(teacher: str | None) -> tuple[str, str]:
    """The teacher to load and a sentence saying which it is; a local folder is made absolute
    (the memory probes run from the repository root)."""
    if teacher is None:
        quickstart = ROOT / QUICKSTART_TEACHER
        if quickstart.is_dir():
            return str(quickstart), f"fine-tuned all-MiniLM-L6-v2 from the quickstart ({QUICKSTART_TEACHER})"
        return PACKAGED_TEACHER, "packaged all-MiniLM-L6-v2 with an untrained 2-label head (no quickstart teacher found)"
    folder = Path(teacher)
    if not (folder / "config.json").is_file():
        return teacher, f"{teacher} (given with --teacher)"
    model_config = json.loads((folder / "config.json").read_text())
    architecture = ", ".join(model_config.get("architectures") or [model_config.get("model_type", "unknown architecture")])
    layers = model_config.get("num_hidden_layers", "?")
    stored = model_config.get("dtype") or model_config.get("torch_dtype") or "float32"
    upcast = "" if stored == "float32" else f"; weights stored as {stored}, upcast to float32 for every contender"
    return str(folder.resolve()), f"{teacher} (given with --teacher: {architecture}, {layers} layers{upcast})"


def data_files_in(folder: Path) -> dict[str, str]:
    """The split files of ``folder``: ``train``, ``validation`` and ``test``, each ``.parquet`` or
    ``.csv`` (all three are needed: a missing split would be carved from the training rows)."""
    if not folder.is_dir():
        raise ValueError(f"--data-files {folder}: no such folder")
    files, problems = {}, []
    for split in DATA_SPLITS:
        found = [folder / f"{split}{suffix}" for suffix in DATA_FILE_TYPES if (folder / f"{split}{suffix}").is_file()]
        if len(found) == 1:
            files[split] = str(found[0].resolve())
        else:
            problems.append(f"{'no' if not found else 'more than one'} {' / '.join(f'{split}{x}' for x in DATA_FILE_TYPES)}")
    if problems:
        held = ", ".join(sorted(p.name for p in folder.iterdir())) or "nothing"
        raise ValueError(f"--data-files {folder}: {'; '.join(problems)} (the folder holds {held})")
    return files


def describe_data(config: BenchConfig) -> str:
    """Which data the contenders train on, for the report: the packaged set, or the files (with the
    provenance of a materialised packaged split when its ``splits.json`` lies beside them)."""
    if config.data_files is None:
        return str(config.dataset)
    paths = [Path(path) for path in config.data_files.values()]
    folders = {path.parent for path in paths}
    if len(folders) == 1:
        files = f"local files in {folders.pop()} ({', '.join(path.name for path in paths)})"
    else:
        files = "local files " + ", ".join(str(path) for path in paths)
    record = paths[0].parent / "splits.json"
    if not record.is_file():
        return files
    splits = json.loads(record.read_text())
    return (
        f"{files}, materialised from {splits.get('dataset')} (source sha256 "
        f"{str(splits.get('source_sha256'))[:12]}, split seed {splits.get('seed')})"
    )


# ---- data: one fixed order of full batches for everyone --------------------------------------------
class FixedOrderData(TextClassificationDataModule):
    """The training split served in one seeded order of full batches, the same for every contender.

    The order is long enough for ``total_batches`` batches (permutations repeat when the split is
    shorter), so no contender crosses an epoch boundary inside the benchmark. ``pin_memory``: the
    loader pins its batches (for non-blocking copies to a GPU).
    """

    def __init__(self, total_batches: int, order_seed: int, pin_memory: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.total_batches = total_batches
        self.order_seed = order_seed
        self.pin_memory = pin_memory

    def train_dataloader(self) -> DataLoader:
        n = len(self.datasets["train"])
        needed = self.total_batches * self.batch_size
        generator = torch.Generator().manual_seed(self.order_seed)
        order = torch.cat([torch.randperm(n, generator=generator) for _ in range(math.ceil(needed / n))])
        return DataLoader(
            self.datasets["train"].with_format("torch"),
            batch_size=self.batch_size,
            sampler=order[:needed].tolist(),
            collate_fn=DataCollatorWithPadding(self.tokenizer),
            pin_memory=self.pin_memory,
        )


def make_data(config: BenchConfig) -> FixedOrderData:
    """A prepared data module (tokenised by ``datasets``, cached after the first run)."""
    source: dict[str, Any] = {"dataset": config.dataset} if config.dataset else {"data_files": config.data_files}
    data = FixedOrderData(
        total_batches=config.timed_steps + 1,
        order_seed=config.seed,
        pin_memory=config.device == "cuda",
        tokenizer=config.teacher,
        max_length=config.max_length,
        batch_size=config.batch_size,
        max_train_samples=config.max_train_samples,
        max_eval_samples=2 * config.batch_size,  # DistillModule's on_fit_start measures the teacher on validation
        **source,
    )
    data.prepare_data()
    data.setup("fit")
    return data


# ---- the objective, written out ------------------------------------------------------------------
def hand_objective(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, config: BenchConfig) -> Tensor:
    """``w_ce CE + w_kd T^2 KL(p_t || p_s)``, ``p = softmax(z / T)``: the formula of
    ``kd_lightning.losses.functional.kl_divergence`` written out for the hand loop."""
    temperature = config.temperature
    log_p_s = F.log_softmax(student_logits / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits / temperature, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1).mean()
    return config.ce_weight * F.cross_entropy(student_logits, labels) + config.kd_weight * temperature**2 * kl


def kd_lightning_losses(config: BenchConfig) -> list[DistillLoss]:
    """The objective as kd_lightning losses: ``CrossEntropy`` and ``KLDivergence``."""
    return [CrossEntropy(weight=config.ce_weight), KLDivergence(weight=config.kd_weight, temperature=config.temperature)]


def textbrewer_kd_weight(config: BenchConfig) -> float:
    """TextBrewer's soft cross-entropy is not scaled by ``T^2``: its weight carries it."""
    return config.kd_weight * config.temperature**2


def torchdistill_kd_loss(config: BenchConfig) -> dict[str, Any]:
    """torchdistill's ``KDLoss``: ``alpha CE + beta T^2 KL`` on the hooked classifier outputs."""
    return {
        "key": "KDLoss",
        "kwargs": {
            "student_module_path": "classifier",
            "student_module_io": "output",
            "teacher_module_path": "classifier",
            "teacher_module_io": "output",
            "temperature": config.temperature,
            "alpha": config.ce_weight,
            "beta": config.kd_weight,
            "reduction": "batchmean",
        },
    }


def objective_check(config: BenchConfig, contenders: list[str]) -> dict[str, Any]:
    """Every contender's objective on the same logits: values and gradients w.r.t. the student's logits."""
    generator = torch.Generator().manual_seed(config.seed)
    teacher = 3 * torch.randn(config.batch_size, config.num_labels, generator=generator)
    base = 3 * torch.randn(config.batch_size, config.num_labels, generator=generator)
    labels = torch.randint(0, config.num_labels, (config.batch_size,), generator=generator)
    batch = {"labels": labels}

    def kd_lightning_total(s: Tensor) -> Tensor:
        student_out, teacher_out = ModelOutputs(logits=s), ModelOutputs(logits=teacher)
        return sum(loss.weight * loss(student_out, teacher_out, batch) for loss in kd_lightning_losses(config))

    objectives: dict[str, Callable[[Tensor], Tensor]] = {
        "kd_lightning": kd_lightning_total,
        "hand": lambda s: hand_objective(s, teacher, labels, config),
    }
    offsets = {"kd_lightning": 0.0, "hand": 0.0}
    if "textbrewer_live" in contenders:
        from textbrewer.losses import kd_ce_loss

        weight = textbrewer_kd_weight(config)
        objectives["textbrewer"] = lambda s: config.ce_weight * F.cross_entropy(s, labels) + weight * kd_ce_loss(
            s, teacher, config.temperature
        )
        p_t = F.softmax(teacher / config.temperature, dim=-1)
        offsets["textbrewer"] = float(weight * -(p_t * p_t.log()).sum(-1).mean())  # teacher entropy: constant
    if "torchdistill_live" in contenders:
        import_torchdistill()
        from torchdistill.losses.registry import get_mid_level_loss

        kd = get_mid_level_loss(torchdistill_kd_loss(config))
        objectives["torchdistill"] = lambda s: kd({"classifier": {"output": s}}, {"classifier": {"output": teacher}}, labels)
        offsets["torchdistill"] = 0.0
    values, grads = {}, {}
    for name, objective in objectives.items():
        s = base.clone().requires_grad_(True)
        value = objective(s)
        value.backward()
        values[name], grads[name] = value.item() - offsets[name], s.grad
    for name in objectives:
        assert math.isclose(values[name], values["kd_lightning"], rel_tol=1e-5, abs_tol=1e-6), (name, values)
        torch.testing.assert_close(grads[name], grads["kd_lightning"], rtol=1e-5, atol=1e-7)
    return {"values_minus_constant": values, "constant_offsets": offsets, "gradients_equal": True}


# ---- pausing a training loop that runs in its own thread ----------------------------------------------
class StopRun(Exception):
    """Raised inside a paused training loop to end it."""


class Pacer:
    """Lets a training loop in its own thread run a given number of steps at a time.

    The loop calls :meth:`tick` once per step at a fixed point (right after the batch is fetched);
    :meth:`advance` lets it run ``n`` steps and returns the seconds between the tick that resumed
    it and the tick that paused it, i.e. exactly ``n`` full iterations. With ``synchronize`` (CUDA)
    each of those two ticks waits for the GPU's queued work before reading the clock, so the
    steps' kernels fall inside their time. The batch's identity is read while the clock is
    stopped (on a GPU batch that is a device-to-host copy).
    """

    def __init__(self, synchronize: bool = False) -> None:
        self.synchronize = synchronize
        self._resume = threading.Semaphore(0)
        self._paused = threading.Semaphore(0)
        self._budget = 0
        self._stop = False
        self._started = self._ended = 0.0
        self.batches: list[int] = []
        self.error: BaseException | None = None
        self.finished = False
        self.profiler: Any = None

    def clock(self) -> float:
        """``time.perf_counter()``, after the GPU's queued work when synchronising."""
        if self.synchronize:
            torch.cuda.synchronize()
        return time.perf_counter()

    def tick(self, batch: Mapping[str, Any]) -> None:
        """Called by the training loop once per step, with the batch it fetched."""
        if self._budget == 0:
            self._ended = self.clock()
            if self.profiler is not None:
                self.profiler.disable()
            identity = hash(tuple(batch["index"].tolist()))
            self._paused.release()
            self._resume.acquire()
            if self._stop:
                raise StopRun
            if self.profiler is not None:
                self.profiler.enable()
            self._started = self.clock()
        else:
            identity = hash(tuple(batch["index"].tolist()))
        self._budget -= 1
        self.batches.append(identity)

    def run(self, loop: Callable[[], None], threads: int) -> None:
        """The worker thread's body: ``loop()`` until it ends or :class:`StopRun`."""
        torch.set_num_threads(threads)
        try:
            loop()
        except StopRun:
            pass
        except BaseException as err:  # reported to the main thread by advance()
            self.error = err
        finally:
            self.finished = True
            self._paused.release()

    def wait_paused(self) -> None:
        self._paused.acquire()
        if self.error is not None:
            raise RuntimeError(f"the training loop failed: {self.error!r}") from self.error
        if self.finished:
            raise RuntimeError("the training loop ended before the benchmark asked it to stop")

    def advance(self, steps: int) -> float:
        """Run ``steps`` steps; the seconds they took."""
        self._budget = steps
        self._resume.release()
        self.wait_paused()
        return self._ended - self._started

    def stop(self) -> None:
        self._stop = True
        self._resume.release()


# ---- contenders ----------------------------------------------------------------------------------------
class Contender:
    """One way of training the student: built in the main thread, trained in its own thread."""

    name = ""
    label = "?"
    description = ""

    def __init__(self, config: BenchConfig) -> None:
        self.config = config
        self.pacer = Pacer(synchronize=config.device == "cuda")
        self.losses: list[float] = []
        self.thread: threading.Thread | None = None
        self.initial: dict[str, Tensor] = {}
        self.tmp = tempfile.TemporaryDirectory(prefix="kd_throughput_")

    @classmethod
    def unavailable(cls, config: BenchConfig) -> str | None:
        """Why this contender cannot run here with ``config`` (its library does not import, the
        device cannot run it), or ``None``."""
        return None

    def prepare(self, data: FixedOrderData) -> None:
        """Build models, optimiser and loop state (untimed)."""
        raise NotImplementedError

    def student(self) -> nn.Module:
        raise NotImplementedError

    def loop(self) -> None:
        """The training loop; calls ``self.pacer.tick(batch)`` after fetching each batch."""
        raise NotImplementedError

    def start(self, snapshot: bool = True) -> None:
        """Snapshot the student (for :meth:`check_trained`), start the loop thread and wait until
        it reaches its first batch."""
        if snapshot:  # on the CPU: a Lightning student moves to the GPU only inside fit
            self.initial = {n: p.detach().to("cpu", copy=True) for n, p in self.student().named_parameters()}
        self.thread = threading.Thread(target=self.pacer.run, args=(self.loop, self.config.threads), name=self.name, daemon=True)
        self.thread.start()
        self.pacer.wait_paused()

    def stop(self) -> None:
        self.pacer.stop()
        if self.thread is not None:
            self.thread.join()
        if self.pacer.error is not None:
            raise RuntimeError(f"{self.name} failed while stopping: {self.pacer.error!r}") from self.pacer.error
        self.tmp.cleanup()

    def check_trained(self) -> dict[str, Any]:
        """Assert that every student parameter changed and the losses are finite."""
        params = dict(self.student().named_parameters())
        unchanged = [n for n, p in params.items() if torch.equal(p.detach().cpu(), self.initial[n])]
        assert not unchanged, f"{self.name}: parameters did not change: {unchanged[:5]}"
        assert self.losses and all(math.isfinite(v) for v in self.losses), f"{self.name}: losses {self.losses[:5]}"
        return {"changed_parameter_tensors": f"{len(params) - len(unchanged)}/{len(params)}"}


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups as kd_lightning makes them: no decay on biases and norm weights."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    no_decay = [p.dim() < 2 or "norm" in n.lower() for n, p in named]
    return [
        {"params": [p for (_, p), skip in zip(named, no_decay, strict=True) if not skip], "weight_decay": weight_decay},
        {"params": [p for (_, p), skip in zip(named, no_decay, strict=True) if skip], "weight_decay": 0.0},
    ]


def constant_schedule(step: int) -> float:
    """The learning-rate factor of ``OptimConfig(warmup_ratio=0, schedule="constant")``: always 1."""
    return lr_multiplier(step, total=1, warmup=0, schedule="constant")


def teacher_and_student(config: BenchConfig) -> tuple[PreTrainedModel, PreTrainedModel]:
    """A frozen teacher and the student copied from its layers, as DistillModule builds them, on
    the benchmark's device, in float32 (a checkpoint saved in float16 loads in float16)."""
    teacher = freeze(load_classifier(config.teacher, config.num_labels)).float()
    student = build_student(StudentSpec(from_teacher_layers=list(config.student_layers)), teacher, config.num_labels)
    return teacher.to(config.device), student.train().to(config.device)


def to_device(batch: Mapping[str, Any], device: str) -> Mapping[str, Any]:
    """The batch's tensors on ``device``, copied without blocking (the batch itself on the CPU)."""
    if device == "cpu":
        return batch
    return {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}


class PacedCallback(pl.Callback):
    """Ticks the pacer at every batch start and records the step's loss."""

    def __init__(self, contender: Contender) -> None:
        self.contender = contender

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self.contender.pacer.tick(batch)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.contender.losses.append(float(outputs["loss"]))


class LightningContender(Contender):
    """A kd_lightning module trained by a real ``lightning.Trainer`` (no logger, checkpoints,
    progress bar, model summary or validation)."""

    def make_module(self) -> pl.LightningModule:
        raise NotImplementedError

    def prepare(self, data: FixedOrderData) -> None:
        self.module = self.make_module().float()  # float32 weights, as teacher_and_student's
        self.data = make_data(self.config)  # its own instance: the trainer attaches itself to it
        self.trainer = pl.Trainer(
            accelerator="gpu" if self.config.device == "cuda" else "cpu",
            devices=1,
            precision=PRECISIONS[self.config.precision][0],
            max_steps=self.config.timed_steps + 1,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=self.tmp.name,
            callbacks=[PacedCallback(self)],
        )

    def student(self) -> nn.Module:
        return self.module.student

    def loop(self) -> None:
        self.trainer.fit(self.module, datamodule=self.data)

    def check_trained(self) -> dict[str, Any]:
        info = super().check_trained()
        assert self.trainer.global_step == self.config.timed_steps, (self.name, self.trainer.global_step)
        info["optimizer_steps"] = self.trainer.global_step
        return info

    def distill_module(self, **extra: Any) -> DistillModule:
        """The benchmark's DistillModule (teacher, layer-copied student, CE + KD), plus ``extra`` arguments."""
        return DistillModule(
            teacher=TeacherSpec(self.config.teacher, self.config.num_labels),
            student=StudentSpec(from_teacher_layers=list(self.config.student_layers)),
            losses=kd_lightning_losses(self.config),
            optim=self.config.optim(),
            **extra,
        )


class LightningLive(LightningContender):
    name = "lightning_live"
    label = "a"
    description = "kd_lightning DistillModule, live teacher, lightning.Trainer"

    def make_module(self) -> pl.LightningModule:
        return self.distill_module()


class LightningLiveGraphs(LightningContender):
    name = "lightning_live_graphs"
    label = "h"
    description = "kd_lightning DistillModule, live teacher replayed from CUDA graphs (teacher_cuda_graphs), lightning.Trainer"

    @classmethod
    def unavailable(cls, config: BenchConfig) -> str | None:
        if config.device != "cuda":
            return "CUDA graphs need --device cuda"
        return None

    def make_module(self) -> pl.LightningModule:
        return self.distill_module(teacher_cuda_graphs=CudaGraphConfig())

    def check_trained(self) -> dict[str, Any]:
        info = super().check_trained()
        graphs = self.module.teacher_graphs
        assert graphs is not None and graphs.replays + graphs.eager_calls == self.config.timed_steps, (self.name, graphs)
        info["teacher_graphs"] = {"captured": graphs.captures, "replays": graphs.replays, "eager": graphs.eager_calls}
        return info


class LightningCache(LightningContender):
    name = "lightning_cache"
    label = "c"
    description = "kd_lightning DistillModule, teacher logits from TeacherCache, lightning.Trainer"

    def make_module(self) -> pl.LightningModule:
        return self.distill_module(teacher_cache=TeacherCacheConfig(root=self.config.cache_root))

    def prepare(self, data: FixedOrderData) -> None:
        super().prepare(data)
        started = time.perf_counter()
        self.module.to(self.config.device)  # a missing cache is built on the benchmark's device
        self.module.open_teacher_cache(data)  # builds the cache when missing; fit's set-up then opens it
        self.cache_open_s = time.perf_counter() - started


class LightningStudent(LightningContender):
    name = "lightning_student"
    label = "d"
    description = "kd_lightning FineTuneModule: the student alone on CE (no teacher, no KD), lightning.Trainer"

    def make_module(self) -> pl.LightningModule:
        return FineTuneModule(
            model=self.config.teacher,
            num_labels=self.config.num_labels,
            student=StudentSpec(from_teacher_layers=list(self.config.student_layers)),
            optim=self.config.optim(),
        )


class MinimalModule(pl.LightningModule):
    """The hand loop's work (b) as a bare LightningModule: the teacher under no_grad (unregistered,
    as DistillModule's), the student, the same objective, AdamW + LambdaLR per step; no logging."""

    def __init__(self, config: BenchConfig) -> None:
        super().__init__()
        teacher, self.student = teacher_and_student(config)
        object.__setattr__(self, "teacher", teacher)
        self.config = config

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor:
        inputs = model_inputs(batch)
        with torch.no_grad():
            teacher_logits = self.teacher(**inputs).logits
        student_logits = self.student(**inputs).logits
        return hand_objective(student_logits.float(), teacher_logits.float(), batch["labels"], self.config)

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = torch.optim.AdamW(parameter_groups(self.student, self.config.weight_decay), lr=self.config.lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, constant_schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class LightningMinimal(LightningContender):
    name = "lightning_minimal"
    label = "g"
    description = "the hand loop's work as a bare LightningModule (no logging), lightning.Trainer: Lightning's floor"

    def make_module(self) -> pl.LightningModule:
        return MinimalModule(self.config)


class HandLoop(Contender):
    name = "hand_live"
    label = "b"
    description = "hand-written PyTorch loop, live teacher (no_grad), same objective, AdamW + LambdaLR"

    def prepare(self, data: FixedOrderData) -> None:
        self.teacher, self._student = teacher_and_student(self.config)
        self.optimizer = torch.optim.AdamW(parameter_groups(self._student, self.config.weight_decay), lr=self.config.lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, constant_schedule)
        self.loader = data.train_dataloader()

    def student(self) -> nn.Module:
        return self._student

    def loop(self) -> None:
        for batch in self.loader:
            self.pacer.tick(batch)
            batch = to_device(batch, self.config.device)
            inputs = model_inputs(batch)
            with self.config.autocast():
                with torch.no_grad():
                    teacher_logits = self.teacher(**inputs).logits
                student_logits = self._student(**inputs).logits
            loss = hand_objective(student_logits.float(), teacher_logits.float(), batch["labels"], self.config)
            loss.backward()
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad()
            self.losses.append(loss.item())


class HandLoopCopy(HandLoop):
    name = "hand_live_copy"
    label = "b'"
    description = "a second, identical copy of b: the A/A control (its ratio to b is this run's resolution)"


class TextBrewerLive(Contender):
    name = "textbrewer_live"
    label = "e"
    description = "textbrewer GeneralDistiller.train, live teacher, logits + hard-label loss adaptors"

    @classmethod
    def unavailable(cls, config: BenchConfig) -> str | None:
        try:
            import textbrewer  # noqa: F401
        except ImportError as err:
            return f"textbrewer cannot be imported ({err}); install it with `pip install textbrewer`"
        return None

    def prepare(self, data: FixedOrderData) -> None:
        from textbrewer import DistillationConfig, GeneralDistiller, TrainingConfig

        contender = self

        class RecordingDistiller(GeneralDistiller):
            """GeneralDistiller whose per-step loss write (``.item()``, as TextBrewer's own) is kept,
            and whose per-batch forwards and losses run under the benchmark's autocast."""

            def write_loss(self, total_loss: Tensor, writer_step: int, losses_dict: dict | None = None) -> None:
                contender.losses.append(total_loss.item())

            def train_on_batch(self, batch: Any, args: Any) -> tuple[Tensor, dict]:
                with contender.config.autocast():
                    return super().train_on_batch(batch, args)

        teacher, self._student = teacher_and_student(self.config)
        train_config = TrainingConfig(
            device=self.config.device, output_dir=self.tmp.name, ckpt_steps=self.config.timed_steps + 1, log_dir=None
        )
        distill_config = DistillationConfig(
            temperature=self.config.temperature,
            kd_loss_type="ce",
            kd_loss_weight=textbrewer_kd_weight(self.config),
            hard_label_weight=self.config.ce_weight,
        )
        self.distiller = RecordingDistiller(
            train_config, distill_config, teacher, self._student, adaptor_T=self.teacher_adaptor, adaptor_S=self.student_adaptor
        )
        self.optimizer = torch.optim.AdamW(parameter_groups(self._student, self.config.weight_decay), lr=self.config.lr)
        self.loader = data.train_dataloader()

    @staticmethod
    def teacher_adaptor(batch: Any, outputs: Any) -> dict[str, Any]:
        return {"logits": outputs.logits}

    @staticmethod
    def student_adaptor(batch: Any, outputs: Any) -> dict[str, Any]:
        return {"logits": outputs.logits, "losses": outputs.loss}

    def student(self) -> nn.Module:
        return self._student

    def postprocess(self, batch: dict[str, Any]) -> dict[str, Any]:
        """TextBrewer's per-batch hook: the teacher gets the inputs, the student inputs and labels."""
        self.pacer.tick(batch)
        inputs = model_inputs(batch)
        return {"teacher": inputs, "student": {**inputs, "labels": batch["labels"]}}

    def loop(self) -> None:
        with self.distiller:  # teacher eval, student train
            self.distiller.train(
                self.optimizer,
                self.loader,
                num_steps=self.config.timed_steps + 1,
                scheduler_class=torch.optim.lr_scheduler.LambdaLR,
                scheduler_args={"lr_lambda": constant_schedule},
                batch_postprocessor=self.postprocess,
            )


def import_torchdistill() -> Any:
    """``torchdistill.core.distillation``, or an ImportError that says what to install."""
    try:
        import torchdistill.core.distillation
    except ImportError as err:
        raise ImportError(
            f"torchdistill cannot be imported ({err}); install it with torchvision: `pip install torchdistill "
            "torchvision==0.28.0` (CPU-only torch: torchvision from https://download.pytorch.org/whl/cpu), or "
            "leave torchdistill_live out of --contenders"
        ) from err
    return torchdistill.core.distillation


class TorchdistillLive(Contender):
    name = "torchdistill_live"
    label = "f"
    description = "torchdistill DistillationBox (KDLoss on forward-hooked classifier outputs), live teacher"

    @classmethod
    def unavailable(cls, config: BenchConfig) -> str | None:
        try:
            import_torchdistill()
        except ImportError as err:
            return str(err)
        return None

    def prepare(self, data: FixedOrderData) -> None:
        distillation = import_torchdistill()
        teacher, self._student = teacher_and_student(self.config)
        hooked = {"forward_proc": "forward_batch_only_as_kwargs", "forward_hook": {"input": [], "output": ["classifier"]}}
        train_config = {
            "teacher": {**hooked, "requires_grad": False},
            "student": {**hooked, "requires_grad": True},
            "optimizer": {"key": "AdamW", "kwargs": {"lr": self.config.lr, "weight_decay": self.config.weight_decay}},
            "scheduler": {"key": "LambdaLR", "kwargs": {"lr_lambda": constant_schedule}, "scheduling_step": 1},
            "criterion": {
                "key": "WeightedSumLoss",
                "kwargs": {"sub_terms": {"kd": {"criterion": torchdistill_kd_loss(self.config), "weight": 1.0}}},
            },
            "num_epochs": 1,
        }
        self.box = distillation.get_distillation_box(
            teacher, self._student, {}, train_config, torch.device(self.config.device), None, False, 1
        )
        self.loader = data.train_dataloader()

    def student(self) -> nn.Module:
        return self._student

    def loop(self) -> None:
        self.box.pre_epoch_process(epoch=0)  # clears the hook dicts, student in train mode
        for batch in self.loader:
            self.pacer.tick(batch)
            batch = to_device(batch, self.config.device)  # the box moves the models, its example loops the batches
            with self.config.autocast():
                loss = self.box.forward_process(model_inputs(batch), batch["labels"])
            self.box.post_forward_process(loss)  # backward, AdamW step, zero_grad, scheduler step
            self.losses.append(loss.item())


CONTENDERS: dict[str, type[Contender]] = {
    c.name: c
    for c in (
        LightningLive, HandLoop, HandLoopCopy, LightningCache, LightningStudent, TextBrewerLive, TorchdistillLive,
        LightningMinimal, LightningLiveGraphs,
    )
}
#: (numerator, denominator, kind, threshold): throughput ratio >= threshold, or step-cost ratio <= threshold;
#: ``control`` and ``report`` rows have no target.
TARGETS = [
    ("hand_live_copy", "hand_live", "control", None),
    ("lightning_live", "hand_live", "throughput", 0.95),
    ("lightning_cache", "lightning_student", "step_cost", 1.15),
    ("lightning_live", "textbrewer_live", "throughput", 1.0),
    ("lightning_live", "torchdistill_live", "throughput", 1.0),
    ("lightning_cache", "textbrewer_live", "report", None),
    ("lightning_cache", "torchdistill_live", "report", None),
    ("lightning_live", "lightning_minimal", "report", None),
    ("lightning_minimal", "hand_live", "report", None),
    ("lightning_live_graphs", "hand_live", "throughput", 0.95),
    ("lightning_live_graphs", "textbrewer_live", "throughput", 1.0),
    ("lightning_live_graphs", "torchdistill_live", "throughput", 1.0),
    ("lightning_live_graphs", "lightning_live", "report", None),
]


# ---- the run -------------------------------------------------------------------------------------------
def quiet_libraries() -> None:
    for name in ("lightning.pytorch", "lightning.fabric", "Distillation", "torchdistill"):
        logging.getLogger(name).setLevel(logging.WARNING)


def resolve_contenders(names: list[str] | None, config: BenchConfig) -> tuple[list[str], dict[str, str]]:
    """The contenders to run and the ones skipped, with the reason.

    ``None`` (no ``--contenders``): every contender that can run with ``config`` (its library
    imports, the device suits it); the others are skipped. A list: exactly those; an unknown
    name, or one that cannot run, is an error.
    """
    if names is None:
        reasons = {name: CONTENDERS[name].unavailable(config) for name in CONTENDERS}
        return [n for n, why in reasons.items() if why is None], {n: why for n, why in reasons.items() if why is not None}
    unknown = [n for n in names if n not in CONTENDERS]
    if unknown:
        raise ValueError(f"unknown contenders {unknown}; choose from {list(CONTENDERS)}")
    for name in names:
        why = CONTENDERS[name].unavailable(config)
        if why is not None:
            raise ValueError(f"contender {name} was asked for, but {why}")
    return list(names), {}


def build_contenders(config: BenchConfig, data: FixedOrderData, names: list[str]) -> dict[str, Contender]:
    contenders = {}
    for name in names:
        contender = CONTENDERS[name](config)
        contender.prepare(data)
        contender.start()
        contenders[name] = contender
    return contenders


def run_benchmark(config: BenchConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Time every contender in alternation; return the measurements, checks and ratios."""
    quiet_libraries()
    torch.set_num_threads(config.threads)
    check_config(config)
    names, _ = resolve_contenders(config.contenders, config)
    load_start = os.getloadavg()
    objectives = objective_check(config, names)
    data = make_data(config)
    log(f"data: {len(data.datasets['train'])} training rows; building {len(names)} contenders")
    contenders = build_contenders(config, data, names)
    if config.warmup_steps:
        for name, contender in contenders.items():
            contender.pacer.advance(config.warmup_steps)
            log(f"  warm-up {name}: {config.warmup_steps} steps")
    windows: dict[str, list[float]] = {name: [] for name in names}
    step_seconds: dict[str, list[float]] = {name: [] for name in names}
    shuffler = random.Random(config.seed)
    for repeat in range(config.repeats):
        for _ in range(config.steps):
            for name in shuffler.sample(names, len(names)):  # one step each, in a new random order every round
                step_seconds[name].append(contenders[name].pacer.advance(1))
        for name in names:
            windows[name].append(sum(step_seconds[name][-config.steps :]))
        cells = ", ".join(f"{n} {config.steps * config.batch_size / windows[n][-1]:.1f}" for n in names)
        log(f"  repeat {repeat + 1}/{config.repeats} (samples/s): {cells}")
    for contender in contenders.values():
        contender.stop()
    reference = contenders[names[0]].pacer.batches
    for name, contender in contenders.items():
        assert contender.pacer.batches == reference, f"{name} saw other batches than {names[0]}"
    results = {}
    for name, contender in contenders.items():
        throughput = [config.steps * config.batch_size / seconds for seconds in windows[name]]
        first, last = contender.losses[: config.steps], contender.losses[-config.steps :]
        results[name] = {
            "label": contender.label,
            "description": contender.description,
            "window_seconds": windows[name],
            "step_seconds": step_seconds[name],
            "samples_per_s": throughput,
            "median_samples_per_s": statistics.median(throughput),
            "median_step_ms": 1000 * statistics.median(windows[name]) / config.steps,
            "loss_first_steps_mean": statistics.fmean(first),
            "loss_last_steps_mean": statistics.fmean(last),
            **contender.check_trained(),
        }
    cache = contenders.get("lightning_cache")
    return {
        "config": dataclasses.asdict(config),
        "objective_check": objectives,
        "contenders": results,
        "ratios": ratios(results),
        "train_rows": len(data.datasets["train"]),
        "same_batches": f"all {len(names)} contenders saw the same {len(reference)} batches in the same order",
        "cache_open_or_build_s": getattr(cache, "cache_open_s", None),
        "load_average": {"start": load_start, "end": os.getloadavg()},
    }


def ratios(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The target pairs' ratios: per repeat and their median (what the targets are judged on), the
    ratio of all timed steps pooled, and the median of the per-round ratios (the two contenders'
    steps of the same round); whether each target is met."""
    rows = []
    for num, den, kind, threshold in TARGETS:
        if num not in results or den not in results:
            continue
        fields = {"per_repeat": "window_seconds", "per_round": "step_seconds"}
        values = {  # throughput ratio num/den = time of den / time of num
            key: [b / a for a, b in zip(results[num][field], results[den][field], strict=True)]
            for key, field in fields.items()
        }
        pooled = sum(results[den]["window_seconds"]) / sum(results[num]["window_seconds"])
        if kind == "step_cost":
            values = {key: [1 / v for v in vs] for key, vs in values.items()}
            pooled = 1 / pooled
        per_repeat = values["per_repeat"]
        median = statistics.median(per_repeat)
        met = None if threshold is None else (median >= threshold if kind == "throughput" else median <= threshold)
        rows.append(
            {
                "pair": f"{results[num]['label']}/{results[den]['label']}",
                "numerator": num,
                "denominator": den,
                "kind": kind,
                "per_repeat": per_repeat,
                "median": median,
                "pooled": pooled,
                "median_per_round": statistics.median(values["per_round"]),
                "threshold": threshold,
                "met": met,
            }
        )
    return rows


# ---- memory: a fresh process per contender ----------------------------------------------------------------
def max_rss_mb() -> float:
    """Peak resident set size of this process's address space so far, in MiB.

    Linux: ``VmHWM`` of ``/proc/self/status``. Not ``getrusage(RUSAGE_SELF).ru_maxrss``: Linux
    carries the parent's peak into a child across fork/vfork + exec, so a probe started from the
    benchmark (several GB) would report the benchmark's peak. Elsewhere: ``ru_maxrss``.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    scale = 1024 * 1024 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


def max_cuda_mb() -> float:
    """Peak CUDA memory allocated by tensors since the last reset (``torch.cuda.max_memory_allocated``), in MiB."""
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**20


def memory_probe(config: BenchConfig, name: str) -> dict[str, float]:
    """Peak RSS of this process after set-up and after ``memory_steps`` steps of contender ``name``;
    on CUDA also the peak CUDA memory allocated (counted from after the data are prepared)."""
    quiet_libraries()
    torch.set_num_threads(config.threads)
    cuda = config.device == "cuda"

    def peaks(rss_key: str, cuda_key: str) -> dict[str, float]:
        return {rss_key: max_rss_mb(), **({cuda_key: max_cuda_mb()} if cuda else {})}

    after_imports = max_rss_mb()
    data = make_data(config)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    if name == "baseline":
        return {"after_imports_mb": after_imports, **peaks("peak_rss_mb", "cuda_peak_mb")}
    contender = CONTENDERS[name](config)
    contender.prepare(data)
    contender.start(snapshot=False)
    after_setup = peaks("after_setup_mb", "cuda_after_setup_mb")
    contender.pacer.advance(config.memory_steps)
    contender.stop()
    return {"after_imports_mb": after_imports, **after_setup, **peaks("peak_rss_mb", "cuda_peak_mb")}


def peak_memory_column(config: Mapping[str, Any]) -> tuple[str, str]:
    """The memory figure of the contender tables: its key in a probe's result and its column title."""
    return ("cuda_peak_mb", "peak CUDA MB") if config.get("device") == "cuda" else ("peak_rss_mb", "peak RSS MB")


def measure_memory(config: BenchConfig, names: list[str], log: Callable[[str], None] = print) -> dict[str, dict]:
    """Run :func:`memory_probe` for ``baseline`` and each contender in a fresh interpreter."""
    memory = {}
    env = {**os.environ, "OMP_NUM_THREADS": str(config.threads)}
    for name in ["baseline", *names]:
        command = [sys.executable, str(Path(__file__).resolve()), "--memory-probe", name, "--config-json", json.dumps(dataclasses.asdict(config))]
        done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
        lines = [line for line in done.stdout.splitlines() if line.startswith(MEMORY_PROBE_TAG)]
        if done.returncode != 0 or not lines:
            raise RuntimeError(f"memory probe {name} failed ({done.returncode}):\n{done.stderr[-3000:]}")
        memory[name] = json.loads(lines[-1][len(MEMORY_PROBE_TAG) :])
        cuda = f", peak CUDA {memory[name]['cuda_peak_mb']:.0f} MB" if "cuda_peak_mb" in memory[name] else ""
        log(f"  memory {name}: peak RSS {memory[name]['peak_rss_mb']:.0f} MB{cuda}")
    return memory


# ---- profiling ---------------------------------------------------------------------------------------------
PROFILE_GROUPS = ("kd_lightning", "lightning", "textbrewer", "torchdistill", "transformers", "torch", "benchmarks")


def profile_groups(stats: pstats.Stats) -> dict[str, float]:
    """Seconds of own time (``tottime``) per package; ``C functions`` are builtins (torch's ops mostly)."""
    groups: dict[str, float] = {}
    for (filename, _, _), (_, _, tottime, _, _) in stats.stats.items():  # type: ignore[attr-defined]
        if filename == "~":
            group = "C functions"
        else:
            parts = Path(filename).parts
            group = next((g for g in PROFILE_GROUPS if g in parts), "other Python")
        groups[group] = groups.get(group, 0.0) + tottime
    return dict(sorted(groups.items(), key=lambda kv: -kv[1]))


def profile_contender(config: BenchConfig, name: str, top: int = 25) -> str:
    """cProfile of ``config.steps`` steps of one contender after its warm-up (its thread only): own
    time per package per step, then the functions with the most own time."""
    quiet_libraries()
    torch.set_num_threads(config.threads)
    contender = CONTENDERS[name](config)
    contender.prepare(make_data(config))
    contender.start()
    if config.warmup_steps:
        contender.pacer.advance(config.warmup_steps)
    profiler = cProfile.Profile()
    contender.pacer.profiler = profiler
    seconds = contender.pacer.advance(config.steps)
    contender.stop()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    calls = sum(ncalls for (_, ncalls, _, _, _) in stats.stats.values())  # type: ignore[attr-defined]
    lines = [f"{name}: {config.steps} steps in {seconds:.2f} s ({1000 * seconds / config.steps:.1f} ms/step), "
             f"{calls / config.steps:.0f} Python/C calls per step", "own time per step (ms) by package:"]
    lines += [f"  {group:14} {1000 * t / config.steps:9.2f}" for group, t in profile_groups(stats).items()]
    stats.sort_stats("tottime").print_stats(top)
    return "\n".join(lines) + "\n" + out.getvalue()


# ---- environment and report ----------------------------------------------------------------------------------
def cuda_environment() -> dict[str, Any]:
    """The GPU, the CUDA/cuDNN/driver versions and the float32 matmul settings."""
    properties = torch.cuda.get_device_properties(0)
    info = {
        "device": torch.cuda.get_device_name(0),
        "capability": f"{properties.major}.{properties.minor}",
        "memory_gib": round(properties.total_memory / 2**30, 1),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "driver": None,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "tf32_cudnn": torch.backends.cudnn.allow_tf32,
    }
    try:
        query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader", "--id=0"]
        info["driver"] = subprocess.run(query, capture_output=True, text=True, check=True).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        pass
    return info


def package_version(package: str) -> str | None:
    """The installed version of ``package``; for a package found on ``PYTHONPATH`` without install
    metadata, its ``__version__``; ``None`` when it is absent or does not import."""
    import importlib
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        pass
    try:
        return getattr(importlib.import_module(package), "__version__", None)
    except Exception:  # absent, or fails to import
        return None


def environment(device: str = "cpu") -> dict[str, Any]:
    """The machine and the library versions; on ``cuda`` also the GPU (:func:`cuda_environment`)."""
    import lightning
    import transformers

    versions = {"python": platform.python_version(), "torch": torch.__version__, "lightning": lightning.__version__}
    versions["transformers"] = transformers.__version__
    for package in ("textbrewer", "torchdistill", "torchvision"):
        versions[package] = package_version(package)
    cpu = {"model": platform.processor() or platform.machine(), "logical_cpus": os.cpu_count()}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        cpu.update({"model": fields.get("Model name", cpu["model"]), "cores_per_socket": fields.get("Core(s) per socket")})
        cpu.update({"sockets": fields.get("Socket(s)"), "threads_per_core": fields.get("Thread(s) per core")})
    except (OSError, subprocess.CalledProcessError):
        pass
    env = {"platform": platform.platform(), "cpu": cpu, "torch_threads": torch.get_num_threads(), "versions": versions}
    if device == "cuda":
        env["cuda"] = cuda_environment()
    return env


def fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def markdown(result: dict[str, Any]) -> str:
    """The report: command, machine, versions, the table, the targets and the checks."""
    config, env = result["config"], result["environment"]
    memory = result.get("memory") or {}
    peak_key, peak_title = peak_memory_column(config)
    device = config.get("device", "cpu")
    precision = PRECISIONS[config.get("precision", "32")][1]
    if "cuda" in env:
        gpu = env["cuda"]
        device = (
            f"cuda, {gpu['device']} (compute capability {gpu['capability']}, {gpu['memory_gib']} GiB), CUDA {gpu['cuda']}, "
            f"cuDNN {gpu['cudnn']}, driver {gpu['driver'] or 'unknown'}; float32 matmul precision "
            f"{gpu['float32_matmul_precision']} (TF32 matmul {'on' if gpu['tf32_matmul'] else 'off'}, "
            f"cuDNN TF32 {'on' if gpu['tf32_cudnn'] else 'off'})"
        )
    lines = [
        "# Throughput of a distillation training step",
        "",
        f"Command: `{result['command']}`  ",
        f"Date: {result['date']} ({result['duration_s']:.0f} s)  ",
        f"Machine: {env['cpu']['model']}, {env['cpu']['logical_cpus']} logical CPUs "
        f"({env['cpu'].get('sockets')} socket x {env['cpu'].get('cores_per_socket')} cores x "
        f"{env['cpu'].get('threads_per_core')} threads), {env['platform']}; torch threads {config['threads']}; "
        f"load average {fmt(result['load_average']['start'][0])} at start, {fmt(result['load_average']['end'][0])} at end  ",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()) + "  ",
        f"Device: {device}; precision: {precision}  ",
        f"Teacher: {result['teacher_source']}; student: layers {config['student_layers']}; data: "
        f"{result.get('data_source', config['dataset'])} ({result['train_rows']} training rows), batch {config['batch_size']}, "
        f"max length {config['max_length']}  ",
        f"Objective: {config['ce_weight']} CE + {config['kd_weight']} T^2 KL, T = {config['temperature']}; "
        f"AdamW lr {config['lr']}, weight decay {config['weight_decay']}, constant LambdaLR  ",
        f"Timing: {config['warmup_steps']} warm-up steps, then {config['repeats']} repeats x {config['steps']} steps "
        "per contender, contenders alternating step by step (rounds of one step each, random order per round); "
        "median over repeats",
        "",
        f"| | contender | samples/s (median) | min - max | ms/step | {peak_title} | loss first -> last window | what is timed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, row in result["contenders"].items():
        peak = memory.get(name, {}).get(peak_key)
        lines.append(
            f"| {row['label']} | `{name}` | {row['median_samples_per_s']:.1f} | {min(row['samples_per_s']):.1f} - "
            f"{max(row['samples_per_s']):.1f} | {row['median_step_ms']:.0f} | {fmt(peak, 0)} | "
            f"{row['loss_first_steps_mean']:.3f} -> {row['loss_last_steps_mean']:.3f} | {row['description']} |"
        )
    lines += [
        "",
        "| ratio | meaning | per repeat | median (judged) | all steps pooled | median per round | target | met |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["ratios"]:
        meaning = {
            "step_cost": "step-cost ratio (time per step)",
            "control": "A/A control: identical work, throughput ratio",
        }.get(r["kind"], "throughput ratio")
        target = "-" if r["threshold"] is None else (f"<= {r['threshold']}" if r["kind"] == "step_cost" else f">= {r['threshold']}")
        met = "-" if r["met"] is None else ("yes" if r["met"] else "**no**")
        per_repeat = ", ".join(f"{v:.3f}" for v in r["per_repeat"])
        lines.append(
            f"| {r['pair']} | {meaning} | {per_repeat} | {r['median']:.3f} | {r['pooled']:.3f} | "
            f"{r['median_per_round']:.3f} | {target} | {met} |"
        )
    if memory:
        base = memory.get("baseline", {})
        cuda = peak_key == "cuda_peak_mb"
        lines += [
            "",
            "Memory: peak RSS (`VmHWM` of /proc/self/status, the address space's high-water mark; `ru_maxrss` would "
            "report the parent benchmark's peak, which Linux carries into the child) of a fresh process per contender that "
            f"builds it, runs its set-up and {config['memory_steps']} training steps. Baseline (imports of torch, "
            f"transformers, lightning, kd_lightning + data): {fmt(base.get('peak_rss_mb'), 0)} MB.",
        ]
        if cuda:
            lines[-1] += (
                " On CUDA also the peak GPU memory allocated by tensors (`torch.cuda.max_memory_allocated`, reset after "
                "the data are prepared, before the contender is built; the caching allocator reserves more), "
                f"baseline {fmt(base.get('cuda_peak_mb'), 0)} MB; the contender table's peak column is this figure."
            )
        header = "| contender | after imports MB | after set-up MB | peak MB |" + (
            " CUDA after set-up MB | CUDA peak MB |" if cuda else ""
        )
        lines += ["", header, "|---" * (header.count("|") - 1) + "|"]
        for name, m in memory.items():
            row = f"| `{name}` | {fmt(m.get('after_imports_mb'), 0)} | {fmt(m.get('after_setup_mb'), 0)} | {fmt(m['peak_rss_mb'], 0)} |"
            if cuda:
                row += f" {fmt(m.get('cuda_after_setup_mb'), 0)} | {fmt(m.get('cuda_peak_mb'), 0)} |"
            lines.append(row)
    checks = result["objective_check"]
    lines += [
        "",
        "Checks (asserted by the script):",
        f"- {result['same_batches']}.",
        "- every student parameter tensor changed in every contender: "
        + ", ".join(f"{r['label']} {r['changed_parameter_tensors']}" for r in result["contenders"].values())
        + "; the Lightning runs made exactly "
        + f"{config['warmup_steps'] + config['repeats'] * config['steps']} optimiser steps.",
        "- the objectives agree on the same logits, values (after removing constant offsets) and gradients: "
        + ", ".join(f"{k} {v:.6f}" for k, v in checks["values_minus_constant"].items())
        + f"; offsets {checks['constant_offsets']} (TextBrewer's soft cross-entropy = KL + teacher entropy).",
    ]
    for name, row in result["contenders"].items():
        if "teacher_graphs" in row:
            g = row["teacher_graphs"]
            lines.append(
                f"- `{name}`: {g['captured']} teacher CUDA graphs captured (one per padded length seen, inside the "
                f"timed steps), {g['replays']} replays, {g['eager']} eager teacher passes."
            )
    if result.get("cache_open_or_build_s") is not None:
        lines.append(f"- teacher cache opened (or built) before timing in {result['cache_open_or_build_s']:.1f} s.")
    if result.get("skipped"):
        lines += ["", "Skipped (not asked for by name, and they cannot run here):"]
        lines += [f"- `{name}`: {reason}" for name, reason in result["skipped"].items()]
    if result.get("notes"):
        lines += ["", "Notes:", *[f"- {note}" for note in result["notes"]]]
    return "\n".join(lines) + "\n"


NOTES = [
    "Reading the ratios: the A/A row (b'/b, two identical hand loops) shows how far identical contenders "
    "drift apart in this run (thread, allocator and machine-load effects); ratios that differ from 1 by "
    "less than that spread are ties. Per-step framework overhead is better read in milliseconds, e.g. "
    "from `--profile NAME` (a cProfile of one contender's steps, own time per package).",
    "All contenders run in worker threads of one process (one at a time; the others wait on a semaphore), "
    "so none has the main thread's advantage; each thread sets torch.set_num_threads to the same value.",
    "Lightning: Trainer(max_steps, limit_val_batches=0, logger=False, enable_checkpointing=False, "
    "enable_progress_bar=False, enable_model_summary=False); DistillModule.on_fit_start's teacher pass over "
    "validation (2 batches' worth of rows here) and the cache build are set-up, outside the windows.",
    "TextBrewer: GeneralDistiller.train(optimizer, loader, num_steps, scheduler_class=LambdaLR, "
    "batch_postprocessor) inside `with distiller:`; its per-step loss `.item()` is kept (write_loss records "
    "it instead of a no-op TensorBoard writer); kd_loss_type 'ce' with kd_loss_weight 0.5 T^2 = the same "
    "gradient as 0.5 T^2 KL; hard_label_weight 0.5 on the student's own HF cross-entropy (labels passed to "
    "the student only); checkpoint saving is never reached (ckpt_steps beyond the run).",
    "torchdistill: get_distillation_box with forward_proc 'forward_batch_only_as_kwargs', forward hooks on "
    "'classifier' outputs, WeightedSumLoss of KDLoss(alpha 0.5, beta 0.5, T 2, batchmean), AdamW and "
    "LambdaLR from its registries; the loop is torchdistill's example loop (box.forward_process then "
    "box.post_forward_process per batch) over the shared loader, not its own DataLoader builder. Its "
    "optimiser has one parameter group (weight decay on every parameter), the others two (no decay on "
    "biases and norms): the same AdamW kernels.",
]
TORCHVISION_NOTE = (
    "torchvision 0.28.0 from PyPI is a CUDA build (0.28.0+cu130); with the CPU torch its C++ ops do not "
    "load and `import torchvision` fails (and with it `from transformers import BertModel`): the script "
    "declares the torchvision::nms/qnms schemas before anything imports torchvision, so that torchdistill "
    "imports (no torchvision op is used)."
)
CUDA_NOTE = (
    "CUDA: the pacer calls torch.cuda.synchronize() before reading the clock where a step ends and where the "
    "next starts, so a step's time includes its kernels; all contenders queue on the same default stream, one "
    "at a time. Lightning copies batches (non-blocking) before on_train_batch_start, the loops right after "
    "their pause point, TextBrewer inside train_on_batch (blocking): every timed step holds one fetch and one "
    "copy. The shared loader pins its batches. The objective check runs on the CPU in float32. The teacher "
    "cache, when missing, is built on the GPU in float32."
)
BF16_NOTE = (
    "bf16-mixed: Lightning precision='bf16-mixed' (autocast around training_step; kd_lightning's losses switch "
    "it off and compute in float32); the hand loops run both forwards under torch.autocast(device, bfloat16) "
    "and the objective on the float32 logits outside it; TextBrewer's GeneralDistiller.train_on_batch (both "
    "forwards and its losses) and torchdistill's box.forward_process (forwards and KDLoss) run under the same "
    "autocast, where softmax, log-softmax, cross-entropy and KL compute in float32. Weights, gradients and "
    "AdamW states stay float32 everywhere."
)


def notes(config: BenchConfig) -> list[str]:
    """The report's notes for this run's device and precision."""
    conditional = [
        (config.device == "cuda", CUDA_NOTE),
        (config.precision == "bf16-mixed", BF16_NOTE),
        (torch.version.cuda is None, TORCHVISION_NOTE),
    ]
    return NOTES + [note for applies, note in conditional if applies]


def write_report(result: dict[str, Any], out_dir: Path, name: str = "throughput") -> tuple[Path, Path]:
    """Write ``<name>.md`` and ``<name>.json`` under ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    md, js = out_dir / f"{name}.md", out_dir / f"{name}.json"
    md.write_text(markdown(result))
    js.write_text(json.dumps(result, indent=2) + "\n")
    return md, js


def benchmark(config: BenchConfig, command: str, memory: bool = True, log: Callable[[str], None] = print) -> dict[str, Any]:
    """The whole benchmark: timing, memory probes and the environment, as one result."""
    check_config(config)
    config.teacher, teacher_source = resolve_teacher(config.teacher)
    config.contenders, skipped = resolve_contenders(config.contenders, config)
    for name, reason in skipped.items():
        log(f"skipping {name}: {reason}")
    started = time.perf_counter()
    date = datetime.now(UTC).isoformat(timespec="seconds")
    result = {"command": command, "date": date, "teacher_source": teacher_source, "environment": environment(config.device)}
    result.update(data_source=describe_data(config), skipped=skipped)
    result.update(run_benchmark(config, log))
    result["memory"] = measure_memory(config, config.contenders, log) if memory and config.memory_steps > 0 else {}
    result["notes"] = notes(config)
    result["duration_s"] = time.perf_counter() - started
    return result


def table(result: dict[str, Any]) -> str:
    """A short plain-text table for the terminal."""
    peak_key, peak_title = peak_memory_column(result["config"])
    rows = [f"{'':2}{'contender':20}{'samples/s':>11}{'ms/step':>9}{peak_title:>13}"]
    for name, row in result["contenders"].items():
        peak = (result.get("memory") or {}).get(name, {}).get(peak_key)
        rows.append(f"{row['label']:2}{name:20}{row['median_samples_per_s']:11.1f}{row['median_step_ms']:9.0f}{fmt(peak, 0):>13}")
    for r in result["ratios"]:
        met = "" if r["met"] is None else ("  target met" if r["met"] else "  TARGET MISSED")
        kind = {"step_cost": "step cost", "control": "A/A"}.get(r["kind"], "throughput")
        rows.append(f"{r['pair']:>5} {kind:10} median {r['median']:.3f}{met}")
    return "\n".join(rows)


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 warm-up steps, 3 repeats of 5 steps, 1,024 rows, 2 memory steps")
    parser.add_argument("--teacher", help=f"teacher folder or packaged key (default: {QUICKSTART_TEACHER} if present)")
    parser.add_argument("--student-layers", type=int, nargs="+", help="teacher layers copied into the student (default: 0 5)")
    parser.add_argument(
        "--data-files",
        type=Path,
        metavar="DIR",
        help="read train/validation/test .parquet (or .csv) files from DIR instead of the packaged data set",
    )
    parser.add_argument("--device", choices=DEVICES, default="cpu", help="where every contender trains (default: cpu)")
    parser.add_argument(
        "--precision", choices=list(PRECISIONS), default="32", help="32, or bf16-mixed (bfloat16 autocast) for every contender"
    )
    parser.add_argument("--warmup-steps", type=int)
    parser.add_argument("--steps", type=int, help="steps per timed window")
    parser.add_argument("--repeats", type=int, help="timed windows per contender")
    parser.add_argument("--memory-steps", type=int, help="steps per memory probe; 0 skips the probes")
    parser.add_argument("--max-train-samples", type=int, help="keep only the first N training rows")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--max-length", type=int)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--contenders", nargs="+", choices=list(CONTENDERS))
    parser.add_argument("--cache-root", help="teacher cache folder (default: the project cache)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument("--profile", choices=list(CONTENDERS), help="print a cProfile of one contender's steps instead")
    parser.add_argument("--memory-probe", help=argparse.SUPPRESS)
    parser.add_argument("--config-json", help=argparse.SUPPRESS)
    return parser


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """The benchmark's settings from the command line (``ValueError`` for an unusable ``--data-files``)."""
    config = BenchConfig(device=args.device, precision=args.precision)
    if args.quick:
        config = dataclasses.replace(config, warmup_steps=2, steps=5, repeats=3, memory_steps=2, max_train_samples=1024)
    if args.data_files is not None:
        config = dataclasses.replace(config, dataset=None, data_files=data_files_in(args.data_files))
    overrides = {
        "teacher": args.teacher,
        "student_layers": args.student_layers,
        "warmup_steps": args.warmup_steps,
        "steps": args.steps,
        "repeats": args.repeats,
        "memory_steps": args.memory_steps,
        "max_train_samples": args.max_train_samples,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "threads": args.threads,
        "contenders": args.contenders,
        "cache_root": args.cache_root,
    }
    return dataclasses.replace(config, **{k: v for k, v in overrides.items() if v is not None})


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.memory_probe:
        config = BenchConfig(**json.loads(args.config_json))
        print(MEMORY_PROBE_TAG + json.dumps(memory_probe(config, args.memory_probe)), flush=True)
        return None
    try:  # refuse what cannot be measured before anything is built
        config = config_from_args(args)
        check_config(config)
        resolve_contenders([args.profile] if args.profile else config.contenders, config)
    except ValueError as err:
        parser.error(str(err))
    if args.profile:
        config.teacher = resolve_teacher(config.teacher)[0]
        print(profile_contender(config, args.profile))
        return None
    prefix = f"PYTHONPATH={os.environ['PYTHONPATH']} " if os.environ.get("PYTHONPATH") else ""
    command = prefix + "python benchmarks/throughput.py" + "".join(f" {a}" for a in (sys.argv[1:] if argv is None else argv))
    result = benchmark(config, command)
    md, js = write_report(result, args.out_dir)
    print(table(result))
    print(f"wrote {md} and {js}")
    return result


if __name__ == "__main__":
    main()

"""Time of one AdamW step on the quickstart student (all-MiniLM-L6-v2's layers 0 and 5, 2 labels),
per PyTorch implementation: the per-tensor loop (PyTorch's default on a CPU), ``foreach``
(multi-tensor kernels) and ``fused`` (one kernel over all parameters; kd_lightning's
``optim: {fused: true}``).

    python benchmarks/adamw_step.py              # 5 warm-up steps, 30 rounds
    python benchmarks/adamw_step.py --rounds 10

Each implementation steps its own copy of the student (same weights, same gradients, kd_lightning's
two parameter groups: weight decay 0.01 except biases and norm weights); the implementations
alternate, one step each per round in a new random order, and the median step time is reported
with its ratio to the per-tensor loop. Writes ``benchmarks/results/adamw_step.{md,json}``.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import random
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loss_cost import save_results  # noqa: E402

from kd_lightning.models import load_classifier, student_from_teacher_layers  # noqa: E402
from kd_lightning.training import decay_groups  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
IMPLEMENTATIONS = {
    "per-tensor loop (default on a CPU)": {"foreach": False},
    "foreach": {"foreach": True},
    "fused (optim.fused)": {"fused": True},
}


def optimisers(device: str) -> dict[str, torch.optim.Optimizer]:
    """One AdamW per implementation, each over its own copy of the student with the same gradients."""
    student = student_from_teacher_layers(load_classifier("all-MiniLM-L6-v2", 2), [0, 5]).to(device)
    generator = torch.Generator().manual_seed(0)
    grads = {name: torch.randn(p.shape, generator=generator).to(device) for name, p in student.named_parameters()}
    out = {}
    for label, options in IMPLEMENTATIONS.items():
        model = copy.deepcopy(student)
        for name, param in model.named_parameters():
            param.grad = grads[name].clone()
        out[label] = torch.optim.AdamW(decay_groups(iter([model]), 0.01), lr=1e-4, **options)
    return out


def run(rounds: int, warmup: int, device: str) -> dict:
    optims = optimisers(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for optimizer in optims.values():
        for _ in range(warmup):
            optimizer.step()
    times: dict[str, list[float]] = {label: [] for label in optims}
    order = random.Random(0)
    for _ in range(rounds):
        for label in order.sample(list(optims), len(optims)):
            sync()
            start = time.perf_counter()
            optims[label].step()
            sync()
            times[label].append(time.perf_counter() - start)
    reference = statistics.median(times[next(iter(IMPLEMENTATIONS))])
    parameters = sum(p.numel() for g in next(iter(optims.values())).param_groups for p in g["params"])
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, device {device}",
        "parameters": parameters,
        "rounds": rounds,
        "warmup": warmup,
        "results": {
            label: {"median_ms": 1e3 * statistics.median(t), "min_ms": 1e3 * min(t), "max_ms": 1e3 * max(t),
                    "ratio_to_loop": statistics.median(t) / reference}
            for label, t in times.items()
        },  # fmt: skip
    }


def markdown(result: dict, command: str) -> str:
    lines = [
        "# One AdamW step on the quickstart student",
        "",
        f"Command: `{command}`  ",
        f"Date: {result['date']}; {result['machine']}; {result['parameters']:,} parameters; "
        f"{result['warmup']} warm-up steps, then {result['rounds']} rounds (implementations alternating).",
        "",
        "| implementation | median ms | min - max ms | time / per-tensor loop |",
        "|---|---|---|---|",
    ]
    for label, r in result["results"].items():
        lines.append(f"| {label} | {r['median_ms']:.1f} | {r['min_ms']:.1f} - {r['max_ms']:.1f} | {r['ratio_to_loop']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for adamw_step.md and adamw_step.json")
    args = parser.parse_args(argv)
    result = run(args.rounds, args.warmup, args.device)
    command = "python benchmarks/adamw_step.py" + "".join(f" {a}" for a in (argv if argv is not None else []))
    save_results(args.out, "adamw_step", markdown(result, command), result)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])

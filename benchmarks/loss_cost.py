"""Cost of every distillation loss: time and peak memory of forward + backward, and its share of a
quickstart training step.

    python benchmarks/loss_cost.py            # full grid (several minutes on 2 CPU cores)
    python benchmarks/loss_cost.py --quick    # small grid, fewer repeats
    python benchmarks/loss_cost.py --threads 1   # steadier on a shared machine

Logit losses run on ``rows x classes`` logits with ``classes`` in {2, 32000} (a binary task and a
Llama/T5-sized vocabulary); feature losses on ``rows x width`` features (student and teacher of
the same width, the worst case for the geometry losses) with ``width`` in {384, 768, 4096}.
Rows in {32, 256, 2048}: a pooled batch, a large pooled batch, the token rows of 32 x 64.

The reference is one training step of the quickstart student (all-MiniLM-L6-v2's layers 0 and 5,
batch 32, length 64: forward, cross-entropy, backward, AdamW step); each loss is timed at the
shape that step hands it (32 x 2 logits; 32 x 384 ``cls`` rows and 2048 x 384 ``tokens`` rows).

Time: median over repeats after one warm-up (at least 3 and 2 s; slow cells stop after 10 s).
Memory: peak bytes allocated by the CPU allocator during one forward + backward, from
``torch.profiler``'s memory events, beyond the inputs already held. Writes
``benchmarks/results/loss_cost.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from kd_lightning import losses as L
from kd_lightning.outputs import ModelOutputs

RESULTS = Path(__file__).resolve().parent / "results"
VOCAB = 32000
LOGIT_LOSSES: dict[str, Callable[[], L.DistillLoss]] = {
    "CrossEntropy": L.CrossEntropy,
    "KLDivergence": L.KLDivergence,
    "KLDivergence chunk_size=256": lambda: L.KLDivergence(chunk_size=256),
    "ReverseKLDivergence": L.ReverseKLDivergence,
    "JSDivergence": L.JSDivergence,
    "SkewKLDivergence": L.SkewKLDivergence,
    "SkewReverseKLDivergence": L.SkewReverseKLDivergence,
    "TotalVariationDistance": L.TotalVariationDistance,
    "BalancedDivergence": L.BalancedDivergence,
    "SinkhornDistance": L.SinkhornDistance,
    "DKD": L.DKD,
    "DIST": L.DIST,
}
FEATURE_LOSSES: dict[str, Callable[[], L.DistillLoss]] = {
    name: (lambda cls=cls: cls(student="s", teacher="t"))
    for name, cls in {
        "ProjectedMSE": L.ProjectedMSE,
        "CosineDistance": L.CosineDistance,
        "Procrustes": L.Procrustes,
        "GramDistance": L.GramDistance,
        "CKA": L.CKA,
        "NDLoss": L.NDLoss,
    }.items()
}
SINKHORN_MAX_WORK = 5e9  # n^2 C: SinKD's batch-wise cost matrix beyond this is skipped (minutes on CPU)


def build(make: Callable[[], L.DistillLoss], width: int, classes: int) -> L.DistillLoss:
    loss = make()
    loss.build({"s": width, "t": width}, classes)
    if isinstance(loss, L.NDLoss):
        loss.set_class_means(torch.randn(classes, width))
    return loss


def example(rows: int, classes: int, width: int | None) -> tuple[ModelOutputs, ModelOutputs, dict, list[torch.Tensor]]:
    """Student/teacher outputs; the student tensors require grad (what backward reaches)."""
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(rows) % classes
    if width is None:
        z_s = torch.randn(rows, classes, generator=g).requires_grad_(True)
        student = ModelOutputs(logits=z_s)
        teacher = ModelOutputs(logits=torch.randn(rows, classes, generator=g))
        return student, teacher, {"labels": labels}, [z_s]
    s = torch.randn(rows, width, generator=g).requires_grad_(True)
    student = ModelOutputs(logits=torch.zeros(rows, classes), features={"s": s})
    teacher = ModelOutputs(logits=torch.zeros(rows, classes), features={"t": torch.randn(rows, width, generator=g)})
    return student, teacher, {"labels": labels}, [s]


def median_seconds(step: Callable[[], None], min_repeats: int, budget_s: float) -> float:
    """Median of repeated runs after a warm-up: at least ``min_repeats`` and ``budget_s`` seconds,
    unless one run is so slow that ``5 * budget_s`` pass first."""
    step()
    times: list[float] = []
    while len(times) < 50:
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
        spent = sum(times)
        if (len(times) >= min_repeats and spent >= budget_s) or spent >= 5 * budget_s:
            break
    return statistics.median(times)


def peak_bytes(step: Callable[[], None]) -> int:
    """Peak of the CPU allocator's running total during ``step``, relative to its start."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as folder:
        trace = os.path.join(folder, "trace.json")
        prof.export_chrome_trace(trace)
        with open(trace) as f:
            events = json.load(f)["traceEvents"]
    memory = sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["ts"])
    running = peak = 0
    for event in memory:
        running += event["args"]["Bytes"]
        peak = max(peak, running)
    return peak


def measure(loss: L.DistillLoss, rows: int, classes: int, width: int | None, min_repeats: int, budget_s: float) -> dict:
    student, teacher, batch, leaves = example(rows, classes, width)

    def step() -> None:
        for leaf in leaves:
            leaf.grad = None
        loss.zero_grad(set_to_none=True)
        loss(student, teacher, batch).backward()

    seconds = median_seconds(step, min_repeats, budget_s)
    return {"ms": 1e3 * seconds, "peak_mb": peak_bytes(step) / 2**20}


def student_step_seconds(min_repeats: int, budget_s: float) -> tuple[float, dict[str, ModelOutputs]]:
    """One quickstart training step, and the shapes it hands to the losses."""
    from kd_lightning.models import load_classifier, student_from_teacher_layers

    teacher = load_classifier("all-MiniLM-L6-v2", 2)
    student = student_from_teacher_layers(teacher, [0, 5]).train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1000, teacher.config.vocab_size, (32, 64), generator=g)
    input_ids[:, 0] = 101
    labels = torch.randint(0, 2, (32,), generator=g)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        out = student(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), labels=labels)
        out.loss.backward()
        optimizer.step()

    return median_seconds(step, min_repeats, budget_s), {"width": teacher.config.hidden_size}


def grid(quick: bool) -> tuple[list[int], list[int], list[int]]:
    if quick:
        return [32, 256], [2, VOCAB], [384, 768]
    return [32, 256, 2048], [2, VOCAB], [384, 768, 4096]


def run(quick: bool) -> dict:
    min_repeats, budget = (2, 0.5) if quick else (3, 2.0)
    rows_grid, classes_grid, width_grid = grid(quick)
    results: dict = {
        "meta": {
            "quick": quick,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(),
            "load_average_at_start": os.getloadavg(),
            "date": time.strftime("%Y-%m-%d %H:%M"),
        },
        "grid": [],
        "quickstart": {},
    }
    for name, make in LOGIT_LOSSES.items():
        for classes in classes_grid:
            for rows in rows_grid:
                cell = {"loss": name, "kind": "logits", "rows": rows, "size": classes}
                if name == "SinkhornDistance" and rows * rows * classes > SINKHORN_MAX_WORK:
                    cell["skipped"] = "O(n^2 C) batch-wise cost matrix"
                else:
                    cell |= measure(build(make, 1, classes), rows, classes, None, min_repeats, budget)
                results["grid"].append(cell)
                print(format_cell(cell), flush=True)
    for name, make in FEATURE_LOSSES.items():
        for width in width_grid:
            for rows in rows_grid:
                cell = {"loss": name, "kind": "features", "rows": rows, "size": width}
                cell |= measure(build(make, width, 2), rows, 2, width, min_repeats, budget)
                results["grid"].append(cell)
                print(format_cell(cell), flush=True)

    step_s, shapes = student_step_seconds(min_repeats, budget)
    width = shapes["width"]
    results["quickstart"]["student_step_ms"] = 1e3 * step_s
    for name, make in {**LOGIT_LOSSES, **FEATURE_LOSSES}.items():
        if name in LOGIT_LOSSES:
            cost = {"logits 32x2": measure(build(make, 1, 2), 32, 2, None, min_repeats, budget)["ms"]}
        else:
            cost = {
                f"cls 32x{width}": measure(build(make, width, 2), 32, 2, width, min_repeats, budget)["ms"],
                f"tokens 2048x{width}": measure(build(make, width, 2), 2048, 2, width, min_repeats, budget)["ms"],
            }
        results["quickstart"][name] = {shape: {"ms": ms, "fraction": ms / (1e3 * step_s)} for shape, ms in cost.items()}
    return results


def format_cell(cell: dict) -> str:
    what = f"{cell['loss']:<24} {cell['kind']:<8} rows={cell['rows']:<5} {'C' if cell['kind'] == 'logits' else 'd'}={cell['size']:<6}"
    if "skipped" in cell:
        return f"{what} skipped: {cell['skipped']}"
    return f"{what} {cell['ms']:9.2f} ms {cell['peak_mb']:9.1f} MB"


def markdown(results: dict) -> str:
    meta = results["meta"]
    lines = [
        "# Loss cost (forward + backward)",
        "",
        f"`python benchmarks/loss_cost.py{' --quick' if meta['quick'] else ''} --threads {meta['threads']}` on {meta['date']}: "
        f"torch {meta['torch']}, torch threads: {meta['threads']}, CPU `{meta['cpu']}`, load average at start "
        f"{tuple(round(x, 1) for x in meta['load_average_at_start'])} (a shared machine: other jobs ran meanwhile).",
        "Median time in ms / peak memory allocated during the call in MB. Logits: rows x C; features: rows x d "
        "(student and teacher both d wide).",
        "",
    ]
    for kind, size_name in (("logits", "C"), ("features", "d")):
        cells = [c for c in results["grid"] if c["kind"] == kind]
        columns = sorted({(c["size"], c["rows"]) for c in cells})
        lines.append(f"## {'Logit' if kind == 'logits' else 'Feature'} losses")
        lines.append("")
        lines.append("| loss | " + " | ".join(f"{size_name}={s}, n={r}" for s, r in columns) + " |")
        lines.append("|---|" + "---|" * len(columns))
        for name in dict.fromkeys(c["loss"] for c in cells):
            by_column = {(c["size"], c["rows"]): c for c in cells if c["loss"] == name}
            entries = [
                "skipped"
                if "skipped" in by_column[col]
                else f"{by_column[col]['ms']:.2f} / {by_column[col]['peak_mb']:.1f}"
                for col in columns
            ]
            lines.append(f"| {name} | " + " | ".join(entries) + " |")
        lines.append("")
    quick = results["quickstart"]
    lines += [
        "## Share of a quickstart training step",
        "",
        f"Student step (2-layer MiniLM, batch 32, length 64, forward + backward + AdamW): "
        f"**{quick['student_step_ms']:.0f} ms**. Loss time at the shapes the step hands over, and its share:",
        "",
        "| loss | shape | ms | share of step |",
        "|---|---|---|---|",
    ]
    for name, shapes in quick.items():
        if name == "student_step_ms":
            continue
        for shape, cost in shapes.items():
            flag = "" if cost["fraction"] <= 0.05 else " (over 5%)"
            lines.append(f"| {name} | {shape} | {cost['ms']:.2f} | {100 * cost['fraction']:.2f}%{flag} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small grid and few repeats (about a minute)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for loss_cost.md and loss_cost.json")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = run(args.quick)
    save_results(args.out, "loss_cost", markdown(results), results)
    return results


def save_results(out: Path, name: str, table: str, results: dict) -> None:
    """Print ``table`` and write it to ``<out>/<name>.md``, ``results`` to ``<out>/<name>.json``."""
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.md").write_text(table)
    (out / f"{name}.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

"""The teacher cache against the live teacher: the same final metrics, within noise.

    python benchmarks/cache_equivalence.py --steps 200 --seeds 0 1 2
    python benchmarks/cache_equivalence.py --accelerator gpu --steps -1 --seeds 0 1 2 \\
        --override=--model.init_args.teacher.name_or_path=/tmp/teacher ...

For each seed, one config (default: the quickstart distillation, KD + CE) is fitted twice with
the same seed: once running the teacher every step, once reading its training-split logits
from the float16 :class:`~kd_lightning.teacher_cache.TeacherCache` (built on first use, outside
the timed fits). Both runs see the same batches in the same order and the same dropout masks,
so they differ only by the float16 rounding of the cached teacher outputs. Reported per seed:
final validation and test accuracy, validation loss and wall time of each; and, over seeds,
the largest live-cache difference next to the seed-to-seed spread (standard deviation of the
live runs), the noise level a difference has to be compared with.
Results go to ``benchmarks/results/cache_equivalence.md`` / ``.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from short_runs import build_cli, length_overrides  # noqa: E402

METRICS = ("val/acc", "val/loss", "test/acc")


def fit_and_test(config: str, seed: int, cached: bool, extra: list[str]) -> dict[str, Any]:
    """Fit ``config`` with ``seed`` (live teacher or its cache), then test the final weights."""
    from kd_lightning.commands.cache import build_teacher_cache

    mode = "cache" if cached else "live"
    args = [
        "--config", config, f"--seed_everything={seed}",
        f"--trainer.logger.init_args.name=cache_equivalence/{mode}_seed{seed}", *extra,
    ]
    if cached:
        args.append("--model.init_args.teacher_cache={dtype: float16}")
    cli = build_cli(args)

    if cached:  # the one-off cache build happens here, outside the timed fit
        build_teacher_cache(cli)
    start = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    seconds = time.perf_counter() - start
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("val/")}
    [tested] = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    metrics.update({k: float(v) for k, v in tested.items()})
    return {"seed": seed, "mode": mode, "seconds": seconds, "steps": cli.trainer.global_step, "metrics": metrics}


def summarise(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per metric: the largest |live - cache| over seeds, and the standard deviation of the live runs."""
    by_seed: dict[int, dict[str, dict[str, float]]] = {}
    for run in runs:
        by_seed.setdefault(run["seed"], {})[run["mode"]] = run["metrics"]
    summary = {}
    for metric in METRICS:
        diffs = [abs(pair["live"][metric] - pair["cache"][metric]) for pair in by_seed.values()]
        live = [pair["live"][metric] for pair in by_seed.values()]
        summary[metric] = {
            "max_abs_difference": max(diffs),
            "live_seed_std": statistics.stdev(live) if len(live) > 1 else float("nan"),
        }
    return summary


def markdown(runs: list[dict[str, Any]], summary: dict[str, dict[str, float]], command: str) -> str:
    lines = [
        f"Command: `{command}`",
        "",
        "| seed | teacher | steps | val acc | val loss | test acc | fit time |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in sorted(runs, key=lambda r: (r["seed"], r["mode"] != "live")):
        m = run["metrics"]
        lines.append(
            f"| {run['seed']} | {run['mode']} | {run['steps']} | {m['val/acc']:.4f} | {m['val/loss']:.4f} | "
            f"{m['test/acc']:.4f} | {run['seconds']:.1f} s |"
        )
    lines += ["", "| metric | max abs live - cache difference | std of the live runs over seeds |", "|---|---|---|"]
    for metric, row in summary.items():
        lines.append(f"| {metric} | {row['max_abs_difference']:.4f} | {row['live_seed_std']:.4f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/quickstart/distill.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=200, help="optimiser steps per fit; -1 runs the config's epochs")
    parser.add_argument("--val-every", type=float, default=1.0, help="validation interval: batches (>1) or epoch fraction")
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--override", action="append", default=[], help="extra CLI argument for every fit (repeatable)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/cache_equivalence"))
    args = parser.parse_args(argv)
    command = "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])  # before build_cli trims sys.argv
    from kd_lightning.cli import _quiet_transformers

    _quiet_transformers()
    val_every: int | float = int(args.val_every) if args.val_every > 1 else args.val_every
    extra = [f"--trainer.accelerator={args.accelerator}", "--trainer.devices=1", *args.override]
    if args.steps >= 0:
        extra = length_overrides(args.steps, val_every) + extra
    runs = []
    for seed in args.seeds:
        for cached in (False, True):
            runs.append(fit_and_test(args.config, seed, cached, extra))
            m = runs[-1]["metrics"]
            print(f"seed {seed} {runs[-1]['mode']}: val acc {m['val/acc']:.4f}, test acc {m['test/acc']:.4f}", flush=True)
    summary = summarise(runs)
    table = markdown(runs, summary, command)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(table + "\n")
    result = {"command": command, "runs": runs, "summary": summary}
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()

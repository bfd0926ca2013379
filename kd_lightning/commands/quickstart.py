"""``python -m kd_lightning quickstart``: fine-tune the packaged teacher, distil it, compare.

Any further ``--key=value`` arguments are LightningCLI overrides applied to both runs
(``--trainer.max_steps=5`` for a smoke run).

Runs ``configs/quickstart/teacher.yaml`` (fit, then test on the best checkpoint) and
``configs/quickstart/distill.yaml`` (fit, then test), then prints the teacher's and the
student's test metrics side by side and writes them to ``runs/quickstart/results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "quickstart"


def _fit_and_test(config: Path, overrides: list[str]) -> dict[str, Any]:
    from kd_lightning.cli import KDLightningCLI
    from kd_lightning.models import count_parameters

    start = time.perf_counter()
    sys.argv = sys.argv[:1]  # the overrides travel in args=; LightningCLI warns when argv holds more
    cli = KDLightningCLI(args=["--config", str(config), *overrides], run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    fit_seconds = time.perf_counter() - start
    ckpt = "best" if cli.trainer.checkpoint_callback and cli.trainer.checkpoint_callback.best_model_path else None
    results = cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt, verbose=False)[0]
    return {
        "metrics": {k: float(v) for k, v in results.items()},
        "parameters": count_parameters(cli.model.student),
        "fit_seconds": fit_seconds,
        "log_dir": cli.trainer.log_dir,
    }


def main(argv: list[str]) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m kd_lightning quickstart", description=__doc__)
    parser.add_argument("--config-dir", type=Path, default=CONFIG_DIR, help="folder with teacher.yaml and distill.yaml")
    args, overrides = parser.parse_known_args(argv)
    bad = [o for o in overrides if not o.startswith("--")]
    if bad:
        parser.error(f"unexpected arguments {bad}; overrides look like --trainer.max_steps=5")

    from kd_lightning.cli import _quiet_transformers

    _quiet_transformers()
    start = time.perf_counter()
    teacher = _fit_and_test(args.config_dir / "teacher.yaml", overrides)
    student = _fit_and_test(args.config_dir / "distill.yaml", overrides)
    total = time.perf_counter() - start

    table = Table(title="Quickstart: Rotten Tomatoes (packaged, seeded test split)")
    for column in ("model", "parameters", "test accuracy", "test macro-F1", "test ECE", "fit time"):
        table.add_column(column, justify="right" if column != "model" else "left")
    rows = [("teacher  (MiniLM-L6, fine-tuned)", teacher), ("student  (2 layers, CE + KD)", student)]
    for label, run in rows:
        m = run["metrics"]
        table.add_row(
            label,
            f"{run['parameters'] / 1e6:.1f} M",
            f"{m['test/acc']:.4f}",
            f"{m['test/f1']:.4f}",
            f"{m['test/ece']:.4f}",
            f"{run['fit_seconds'] / 60:.1f} min",
        )
    console = Console()
    console.print(table)
    console.print(f"Total time {total / 60:.1f} min. Logs: {teacher['log_dir']}, {student['log_dir']}")
    summary = {"teacher": teacher, "student": student, "total_seconds": total}
    os.makedirs("runs/quickstart", exist_ok=True)
    Path("runs/quickstart/results.json").write_text(json.dumps(summary, indent=2))
    return summary

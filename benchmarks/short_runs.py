"""Short runs of several method configs at the same run length, side by side.

    python benchmarks/short_runs.py --steps 200 configs/quickstart/distill.yaml configs/methods/lelp.yaml ...

Each config is fitted for ``--steps`` optimiser steps (validation every ``--val-every``), and
the final validation accuracy, macro-F1 and ECE of each are printed and written to
``benchmarks/results/short_runs.md`` / ``.json``. Every run after the first reuses the
tokenised data; the teacher named in the configs must exist (configs/quickstart/teacher.yaml).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any


def build_cli(args: list[str], **kwargs: Any) -> Any:
    """A ``KDLightningCLI`` over ``args`` (``--config`` files and ``--key=value`` overrides), with
    its classes instantiated and nothing run, without the config's ``ExportHF`` callbacks. The arguments travel in ``args=``: LightningCLI
    warns when ``sys.argv`` holds more than the program name, so that is cut."""
    from kd_lightning.callbacks import ExportHF
    from kd_lightning.cli import KDLightningCLI

    sys.argv = sys.argv[:1]
    cli = KDLightningCLI(args=args, run=False, **kwargs)
    # a benchmark run must not overwrite the student a config exports for its users
    cli.trainer.callbacks = [c for c in cli.trainer.callbacks if not isinstance(c, ExportHF)]
    return cli


def length_overrides(steps: int, val_every: int | float) -> list[str]:
    """Overrides that train for ``steps`` optimiser steps whatever the config's epochs, validating
    every ``val_every`` training batches (an int) or fraction of an epoch (a float)."""
    return [f"--trainer.max_steps={steps}", f"--trainer.val_check_interval={val_every}", "--trainer.max_epochs=-1"]


def run(config: str, steps: int, val_every: int) -> dict:
    name = Path(config).stem
    start = time.perf_counter()
    cli = build_cli(
        ["--config", config, *length_overrides(steps, val_every), f"--trainer.logger.init_args.name=short_runs/{name}"]
    )
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("val/")}
    return {"config": config, "steps": steps, "seconds": time.perf_counter() - start, "metrics": metrics}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="+")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--val-every", type=int, default=100)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/short_runs"))
    args = parser.parse_args()
    from kd_lightning.cli import _quiet_transformers

    _quiet_transformers()
    results = [run(c, args.steps, args.val_every) for c in args.configs]
    lines = [
        f"Validation after {args.steps} steps (batch 32), command: `python {' '.join(sys.orig_argv[1:])}`",
        "",
        "| config | val acc | val macro-F1 | val ECE | teacher val acc | wall time |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        m = r["metrics"]
        lines.append(
            f"| {r['config']} | {m.get('val/acc', float('nan')):.4f} | {m.get('val/f1', float('nan')):.4f} | "
            f"{m.get('val/ece', float('nan')):.4f} | {m.get('val/teacher/acc', float('nan')):.4f} | {r['seconds'] / 60:.1f} min |"
        )
    table = "\n".join(lines)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(table + "\n")
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

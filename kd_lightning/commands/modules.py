"""``python -m kd_lightning modules MODEL``: list a model's submodule paths, the tap candidates."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m kd_lightning modules", description=__doc__)
    parser.add_argument("model", help="hub name, local folder or packaged key (all-MiniLM-L6-v2)")
    parser.add_argument("--depth", type=int, default=4, help="deepest path level shown (default 4)")
    parser.add_argument("--grep", default=None, help="only paths containing this text")
    args = parser.parse_args(argv)

    from transformers import AutoModelForSequenceClassification

    from kd_lightning.models import resolve_model_path

    model = AutoModelForSequenceClassification.from_pretrained(resolve_model_path(args.model))
    table = Table(title=f"Submodules of {args.model} (tap paths)")
    table.add_column("path")
    table.add_column("type")
    table.add_column("params", justify="right")
    for name, module in model.named_modules():
        if not name or name.count(".") >= args.depth or (args.grep and args.grep not in name):
            continue
        table.add_row(name, type(module).__name__, f"{sum(p.numel() for p in module.parameters()):,}")
    Console().print(table)

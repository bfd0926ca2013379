"""The folder the project owns for materialised data, converted models and teacher caches."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def cache_root() -> Path:
    """``$KD_LIGHTNING_CACHE``, else ``~/.cache/kd_lightning``."""
    return Path(os.environ.get("KD_LIGHTNING_CACHE", Path.home() / ".cache" / "kd_lightning"))


def build_atomically(target: Path, build: Callable[[Path], None]) -> Path:
    """Create the folder ``target`` by ``build(tmp)`` in a sibling temp folder, then rename.

    An interrupted build leaves only a temp folder behind, never a ``target`` that looks
    complete. If another process finished first, its result is kept.
    """
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target

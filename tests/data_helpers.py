"""Builders for the data tests: a tiny BERT, and small local copies of hub data sets in their
exact schemas (column names, feature types, split names), served in place of the hub."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

WORDS = (
    "the a movie film plot actor scene good great bad awful boring fun dull brilliant terrible love hate "
    "best worst not very is was it this that and but with of to in for on what how why who question "
    "answer same different man woman dog cat runs sits player dvd works broke"
).split()
POSITIVE = ("good", "great", "fun", "brilliant", "love", "best", "works")
NEGATIVE = ("bad", "awful", "boring", "dull", "terrible", "hate", "worst", "broke")


def write_tiny_bert(folder: Path) -> Path:
    """A random 2-layer BERT encoder (hidden 32, 2 heads, intermediate 37) without a head, so any
    ``num_labels`` loads from it, saved with a WordPiece ``BertTokenizerFast``."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(WORDS) + 5,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(folder)
    BertTokenizerFast(vocab=str(vocab), do_lower_case=True).save_pretrained(folder)
    return folder


def sentence(rng: random.Random, label: int | float | None = None) -> str:
    """A few random words, with a sentiment cue when ``label`` is 0 or 1."""
    words = rng.sample(WORDS, rng.randint(2, 9))
    if label in (0, 1):
        words.insert(len(words) // 2, rng.choice(POSITIVE if label else NEGATIVE))
    return " ".join(words)


# ---- hub schemas -------------------------------------------------------------------------------
def _glue(text: tuple[str, ...], names: tuple[str, ...] | None) -> tuple[dict[str, Any], Callable]:
    import datasets

    features = {c: datasets.Value("string") for c in text}
    features["label"] = datasets.ClassLabel(names=list(names)) if names else datasets.Value("float32")
    features["idx"] = datasets.Value("int32")

    def row(rng: random.Random, i: int, split: str) -> dict[str, Any]:
        if split.startswith("test"):
            label: Any = -1 if names else -1.0
        else:
            label = rng.randrange(len(names)) if names else round(rng.uniform(0, 5), 2)
        cue = label if names and len(names) == 2 else None
        return {**{c: sentence(rng, cue) for c in text}, "label": label, "idx": i}

    return features, row


GLUE_SCHEMAS = {
    "cola": (("sentence",), ("unacceptable", "acceptable")),
    "sst2": (("sentence",), ("negative", "positive")),
    "mrpc": (("sentence1", "sentence2"), ("not_equivalent", "equivalent")),
    "qqp": (("question1", "question2"), ("not_duplicate", "duplicate")),
    "stsb": (("sentence1", "sentence2"), None),
    "mnli": (("premise", "hypothesis"), ("entailment", "neutral", "contradiction")),
    "qnli": (("question", "sentence"), ("entailment", "not_entailment")),
    "rte": (("sentence1", "sentence2"), ("entailment", "not_entailment")),
    "wnli": (("sentence1", "sentence2"), ("not_entailment", "entailment")),
}
GLUE_SPLITS = {"mnli": ("train", "validation_matched", "validation_mismatched", "test_matched", "test_mismatched")}


def _sentiment_schemas() -> dict[tuple[str, str | None], tuple[dict[str, Any], Callable, tuple[str, ...]]]:
    import datasets

    string, polarity = datasets.Value("string"), datasets.ClassLabel(names=["neg", "pos"])

    def amazon_polarity(rng: random.Random, i: int, split: str) -> dict[str, Any]:
        label = rng.randrange(2)
        return {"label": label, "title": sentence(rng, label), "content": sentence(rng, label)}

    def amazon_stars(rng: random.Random, i: int, split: str) -> dict[str, Any]:
        label = rng.randrange(5)
        return {"id": f"en_{i:07d}", "text": sentence(rng, int(label > 2)), "label": label, "label_text": str(label)}

    def sentiment140(rng: random.Random, i: int, split: str) -> dict[str, Any]:
        sentiment = rng.choice((0, 2, 4) if split == "test" else (0, 4))
        return {
            "text": sentence(rng, {0: 0, 4: 1}.get(sentiment)),
            "date": "Mon Apr 06 22:19:45 PDT 2009",
            "user": f"user{i}",
            "sentiment": sentiment,
            "query": "NO_QUERY",
        }

    def movie(rng: random.Random, i: int, split: str) -> dict[str, Any]:
        label = -1 if split == "unsupervised" else rng.randrange(2)
        return {"text": sentence(rng, label), "label": label}

    return {
        ("fancyzhx/amazon_polarity", None): (
            {"label": datasets.ClassLabel(names=["negative", "positive"]), "title": string, "content": string},
            amazon_polarity,
            ("train", "test"),
        ),
        ("mteb/amazon_reviews_multi", "en"): (
            {"id": string, "text": string, "label": datasets.Value("int32"), "label_text": string},
            amazon_stars,
            ("train", "validation", "test"),
        ),
        ("stanfordnlp/sentiment140", None): (
            {"text": string, "date": string, "user": string, "sentiment": datasets.Value("int32"), "query": string},
            sentiment140,
            ("train", "test"),
        ),
        ("stanfordnlp/imdb", "plain_text"): ({"text": string, "label": polarity}, movie, ("train", "test", "unsupervised")),
        ("cornell-movie-review-data/rotten_tomatoes", None): (
            {"text": string, "label": polarity},
            movie,
            ("train", "validation", "test"),
        ),
    }


def hub_schemas() -> dict[tuple[str, str | None], tuple[dict[str, Any], Callable, tuple[str, ...]]]:
    """(hub path, config) -> (features, row builder, split names) of every hub set we support."""
    schemas = {}
    for task, (text, names) in GLUE_SCHEMAS.items():
        features, row = _glue(text, names)
        schemas[("nyu-mll/glue", task)] = (features, row, GLUE_SPLITS.get(task, ("train", "validation", "test")))
    schemas.update(_sentiment_schemas())
    return schemas


SPLIT_SIZES = {"train": 48}


def write_split(path: Path, features: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    import datasets

    columns = {name: [row[name] for row in rows] for name in features}
    datasets.Dataset.from_dict(columns, features=datasets.Features(features)).to_parquet(str(path))
    return str(path)


def write_hub_mirror(root: Path) -> dict[tuple[str, str | None], dict[str, str]]:
    """Parquet files of every supported hub set; (path, config) -> {hub split: file}."""
    mirror = {}
    for (path, config), (features, row, splits) in hub_schemas().items():
        folder = root / path.replace("/", "__") / (config or "default")
        folder.mkdir(parents=True, exist_ok=True)
        files = {}
        for split in splits:
            rng = random.Random(f"{path}/{config}/{split}")
            rows = [row(rng, i, split) for i in range(SPLIT_SIZES.get(split, 20))]
            files[split] = write_split(folder / f"{split}.parquet", features, rows)
        mirror[(path, config)] = files
    return mirror


def serve_from_mirror(monkeypatch: Any, mirror: dict[tuple[str, str | None], dict[str, str]]) -> list[tuple]:
    """Make ``datasets.load_dataset(hub path, config, ...)`` read the mirror's parquet files;
    returns the list of (path, config, kwargs) of the calls it served."""
    import datasets

    real = datasets.load_dataset
    served: list[tuple] = []

    def load_dataset(path: str, name: str | None = None, **kwargs: Any) -> Any:
        if (path, name) not in mirror:
            return real(path, name, **kwargs)
        served.append((path, name, kwargs))
        return real("parquet", data_files=mirror[(path, name)])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return served


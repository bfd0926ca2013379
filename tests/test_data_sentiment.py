"""The hub sentiment sets (Amazon, Sentiment140, IMDB, Rotten Tomatoes) through the hub code path,
served from local parquet files in each hub schema."""

from __future__ import annotations

import random

import datasets
import pytest
from helpers import quiet_trainer

from kd_lightning import DistillModule, StudentSpec, TeacherSpec
from kd_lightning.data import SENTIMENT_SETS, SentimentDataModule
from kd_lightning.losses import CrossEntropy, KLDivergence

pytest_plugins = ("data_fixtures",)

HUB_NAMES = {
    "amazon_polarity": ("fancyzhx/amazon_polarity", None, {}),
    "amazon_stars": ("mteb/amazon_reviews_multi", "en", {}),
    "sentiment140": ("stanfordnlp/sentiment140", None, {"revision": "refs/convert/parquet"}),
    "imdb": ("stanfordnlp/imdb", "plain_text", {}),
    "rotten_tomatoes": ("cornell-movie-review-data/rotten_tomatoes", None, {}),
}


def hub_split(mirror: dict, name: str, split: str) -> datasets.Dataset:
    path, config, _ = HUB_NAMES[name]
    return datasets.load_dataset("parquet", data_files={split: mirror[(path, config)][split]})[split]


@pytest.mark.parametrize("name", sorted(SENTIMENT_SETS))
def test_each_set_reads_its_hub_schema(name, hub, hub_mirror, tiny_encoder):
    dm = SentimentDataModule(name, tokenizer=str(tiny_encoder), max_length=16, batch_size=8)
    dm.setup("fit")
    assert hub == [HUB_NAMES[name]]
    expected_classes = 5 if name == "amazon_stars" else 2
    assert dm.num_labels == expected_classes and len(dm.label_names) == expected_classes
    assert dm.monitor == "val/acc" and set(dm.task_metrics().keys()) == {"acc", "f1", "ece"}
    test = hub_split(hub_mirror, name, "test")
    if name in ("amazon_stars", "rotten_tomatoes"):  # the hub has a validation split
        assert "carved_from_train" not in dm.split_record and len(dm.datasets["train"]) == 48
    else:  # validation carved from train with the split seed; test is the hub's test
        assert len(dm.split_record["carved_from_train"]["validation"]) == 5 and len(dm.datasets["train"]) == 43
    if name == "sentiment140":  # 0 -> negative, 4 -> positive, neutral (2) test rows dropped
        kept = [s for s in test["sentiment"] if s != 2]
        assert 0 < len(kept) < len(test)
        assert dm.datasets["test"]["labels"] == [{0: 0, 4: 1}[s] for s in kept]
    else:
        assert dm.datasets["test"]["labels"] == test["label"]
    batch = next(iter(dm.train_dataloader()))
    if name == "amazon_polarity":  # title and content as a text pair
        assert int(batch["token_type_ids"].max()) == 1
    assert set(batch["labels"].tolist()) <= set(range(expected_classes))


def test_imdb_ignores_its_unlabelled_split(hub, tiny_encoder):
    dm = SentimentDataModule("imdb", tokenizer=str(tiny_encoder))
    dm.setup("fit")
    assert set(dm.datasets) == {"train", "validation", "test"}
    assert all(-1 not in dm.datasets[s]["labels"] for s in dm.datasets)


def test_sentiment140_distillation_end_to_end(hub, tiny_encoder, tmp_path):
    model = DistillModule(
        teacher=TeacherSpec(str(tiny_encoder), num_labels=2),
        student=StudentSpec(from_teacher_layers=[0]),
        losses=[CrossEntropy(weight=0.5), KLDivergence(weight=0.5, temperature=2.0)],
    )
    dm = SentimentDataModule("sentiment140", max_length=16, batch_size=8)
    trainer = quiet_trainer(tmp_path)
    trainer.fit(model, dm)
    (result,) = trainer.test(model, dm, verbose=False)
    assert {"test/acc", "test/f1", "test/ece", "test/teacher/acc"} <= set(result)


def test_unknown_label_in_a_hub_set_is_reported(tiny_encoder, tmp_path, hub_mirror, monkeypatch):
    from data_helpers import hub_schemas, serve_from_mirror, write_split

    features, row, _ = hub_schemas()[("stanfordnlp/sentiment140", None)]
    rows = [row(random.Random(0), i, "train") for i in range(8)]
    rows[3]["sentiment"] = 3
    files = {"train": write_split(tmp_path / "train.parquet", features, rows)}
    serve_from_mirror(monkeypatch, {**hub_mirror, ("stanfordnlp/sentiment140", None): files})
    dm = SentimentDataModule("sentiment140", tokenizer=str(tiny_encoder))
    with pytest.raises(ValueError, match=r"the train split has labels \['3'\] outside the label set \(\[0, 4\]\)"):
        dm.setup("fit")


def test_unknown_set_is_named():
    with pytest.raises(ValueError, match="unknown sentiment data set 'yelp'; choose one of amazon_polarity"):
        SentimentDataModule("yelp")

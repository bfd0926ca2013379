"""``SentimentDataModule``: the sentiment sets of the few-class distillation papers, by name.

LELP (Loo et al., 2024, "Linear Projections of Teacher Embeddings for Few-Class Distillation",
arXiv 2409.20449) evaluates on Amazon Reviews and Sentiment140; IMDB and Rotten Tomatoes are
the usual binary sentiment sets beside them. Where the hub has no validation split, one is
carved from ``train`` (``validation_fraction``, ``split_seed``; recorded in
``data_splits.json``); ``test`` is always the hub's test split.

=================  ==========================================  ===================================  ================================
name               hub data set (config)                       columns used                         labels
=================  ==========================================  ===================================  ================================
amazon_polarity    ``fancyzhx/amazon_polarity``                ``title`` + ``content`` (a pair)     ``label``: negative / positive
                                                                                                    (1-2 vs 4-5 stars)
amazon_stars       ``mteb/amazon_reviews_multi`` (``en``)      ``text`` (title and body)            ``label`` 0..4 = 1..5 stars
sentiment140       ``stanfordnlp/sentiment140``                ``text``                             ``sentiment`` 0 -> negative,
                   (revision ``refs/convert/parquet``)                                              4 -> positive; 2 (neutral, test
                                                                                                    only) dropped
imdb               ``stanfordnlp/imdb`` (``plain_text``)       ``text``                             ``label``: neg / pos
rotten_tomatoes    ``cornell-movie-review-data/rotten_tomatoes``  ``text``                          ``label``: neg / pos
=================  ==========================================  ===================================  ================================

Splits: amazon_polarity train 3.6M / test 400k; amazon_stars train 200k / validation 5k /
test 5k; sentiment140 train 1.6M / test 498 (359 after dropping neutral); imdb train 25k /
test 25k (its ``unsupervised`` split is not used); rotten_tomatoes train 8,530 / validation
1,066 / test 1,066. Sentiment140 is a loading-script data set on the hub; ``datasets`` >= 4
reads its parquet conversion (``refs/convert/parquet``). The original ``amazon_reviews_multi``
was withdrawn from the hub; ``mteb/amazon_reviews_multi`` is its maintained copy (columns
``id``, ``text``, ``label``, ``label_text``).
"""

from __future__ import annotations

from typing import Any, Literal

from kd_lightning.data.hub import HubDataModule, HubSchema

SENTIMENT_SETS: dict[str, HubSchema] = {
    "amazon_polarity": HubSchema(
        "fancyzhx/amazon_polarity", text_column="title", text_pair_column="content", label_names=("negative", "positive")
    ),
    "amazon_stars": HubSchema(
        "mteb/amazon_reviews_multi", "en", label_names=("1 star", "2 stars", "3 stars", "4 stars", "5 stars")
    ),
    "sentiment140": HubSchema(
        "stanfordnlp/sentiment140",
        revision="refs/convert/parquet",
        label_column="sentiment",
        label_names=("negative", "positive"),
        label_map={0: 0, 4: 1},
        drop_labels=(2,),
    ),
    "imdb": HubSchema("stanfordnlp/imdb", "plain_text", label_names=("neg", "pos")),
    "rotten_tomatoes": HubSchema("cornell-movie-review-data/rotten_tomatoes", label_names=("neg", "pos")),
}

SentimentSet = Literal["amazon_polarity", "amazon_stars", "sentiment140", "imdb", "rotten_tomatoes"]


class SentimentDataModule(HubDataModule):
    """A hub sentiment data set by name (see the module docstring for schemas and splits).

    Metrics: accuracy, macro F1 and ECE; checkpoints follow ``val/acc``.

    Args:
        dataset: ``amazon_polarity``, ``amazon_stars``, ``sentiment140``, ``imdb`` or
            ``rotten_tomatoes``.
        data_files: local files in the hub layout (split -> path(s)) instead of the hub download.
        **kwargs: loader settings of :class:`~kd_lightning.data.TextClassificationDataModule`.
    """

    def __init__(self, dataset: SentimentSet, data_files: dict[str, str | list[str]] | None = None, **kwargs: Any) -> None:
        if dataset not in SENTIMENT_SETS:
            raise ValueError(f"unknown sentiment data set {dataset!r}; choose one of {', '.join(SENTIMENT_SETS)}")
        super().__init__(SENTIMENT_SETS[dataset], data_files=data_files, **kwargs)
        self.preset = dataset

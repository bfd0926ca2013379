"""``HubDataModule``: a named hub data set whose schema (columns, labels, splits) is known.

A schema says where a data set lives on the Hugging Face hub and how its rows become
``(text, text pair, label)``. The same schema reads local files (``data_files``) in the hub's
layout (e.g. the parquet files of the hub repository, downloaded once), which is also how the
tests exercise these modules offline.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kd_lightning.data.text_classification import TextClassificationDataModule


@dataclass(frozen=True)
class HubSchema:
    """A hub data set and how to read it (see :class:`TextClassificationDataModule` for the fields).

    Attributes:
        path / config / revision: ``datasets.load_dataset(path, config, revision=revision)``.
        text_column / text_pair_column / label_column: the columns used.
        label_names: class names in index order (``None``: from the data's ``ClassLabel``).
        label_map / drop_labels: raw label -> index, and raw labels whose rows are removed.
        split_names: our split -> the hub's split.
        regression: float scores rather than classes.
    """

    path: str
    config: str | None = None
    revision: str | None = None
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str = "label"
    label_names: tuple[str, ...] | None = None
    label_map: Mapping[Any, int] | None = None
    drop_labels: tuple[Any, ...] = ()
    split_names: Mapping[str, str] = field(default_factory=dict)
    regression: bool = False


class HubDataModule(TextClassificationDataModule):
    """A :class:`TextClassificationDataModule` preset by a :class:`HubSchema`.

    Args:
        schema: the data set's schema.
        data_files: read these local files (split -> path(s)) in the schema's layout instead of
            downloading from the hub; their split names are the hub's.
        **kwargs: the loader settings of :class:`TextClassificationDataModule` (``max_length``,
            ``batch_size``, ``tokenizer``, ``max_train_samples``, ``group_by_length``, ...).
    """

    def __init__(self, schema: HubSchema, data_files: dict[str, str | list[str]] | None = None, **kwargs: Any) -> None:
        super().__init__(
            dataset=None if data_files is not None else schema.path,
            dataset_config=schema.config,
            revision=schema.revision,
            data_files=data_files,
            text_column=schema.text_column,
            text_pair_column=schema.text_pair_column,
            label_column=schema.label_column,
            label_names=list(schema.label_names) if schema.label_names else None,
            label_map=dict(schema.label_map) if schema.label_map else None,
            drop_labels=list(schema.drop_labels),
            regression=schema.regression,
            split_names=dict(schema.split_names),
            **kwargs,
        )
        self.schema = schema

"""Speed: tokenisation cached across runs by fingerprint, length-grouped batching, worker processes."""

from __future__ import annotations

import datasets
import pytest
import torch
from datasets.arrow_dataset import Dataset
from helpers import quiet_trainer
from torch.utils.data import RandomSampler

from kd_lightning import FineTuneModule
from kd_lightning.data import GlueDataModule, LengthGroupedBatchSampler

pytest_plugins = ("data_fixtures",)


def cache_files(root) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*.arrow")}


def test_a_second_run_loads_the_tokenised_cache(hub, tiny_encoder, tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf")
    maps: list[str] = []
    real_map_single = Dataset._map_single

    def counting_map_single(*args, **kwargs):
        maps.append(getattr(kwargs.get("function"), "__name__", "?"))
        yield from real_map_single(*args, **kwargs)

    monkeypatch.setattr(Dataset, "_map_single", staticmethod(counting_map_single))

    def run(**settings) -> GlueDataModule:
        dm = GlueDataModule("mrpc", tokenizer=str(tiny_encoder), **{"max_length": 16, **settings})
        dm.setup("fit")
        return dm

    first = run()
    assert maps == ["encode", "encode"]  # train and validation; test is the validation rows: cached already
    written = cache_files(tmp_path / "hf")
    maps.clear()

    second = run()
    assert maps == []  # nothing tokenised again ...
    assert cache_files(tmp_path / "hf") == written  # ... and no new cache file
    for split in ("train", "validation"):
        assert second.datasets[split]["input_ids"] == first.datasets[split]["input_ids"]
        assert second.datasets[split].cache_files == first.datasets[split].cache_files

    run(max_length=12)  # other settings: a new fingerprint, tokenised once more
    assert maps and cache_files(tmp_path / "hf") > written


def test_length_grouped_batches_cover_every_row_once_and_pad_less():
    lengths = torch.randint(3, 120, (997,), generator=torch.Generator().manual_seed(0)).tolist()
    sampler = RandomSampler(range(997), generator=torch.Generator().manual_seed(1))
    batches = LengthGroupedBatchSampler(sampler, batch_size=16, drop_last=False, lengths=lengths, group_size=8, seed=3)
    first, second = list(batches), list(batches)
    assert len(first) == len(batches) == 63
    assert sorted(i for b in first for i in b) == list(range(997))
    assert first != second  # reshuffled every epoch

    def padding(epoch: list[list[int]]) -> int:
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in epoch)

    random_order = torch.randperm(997, generator=torch.Generator().manual_seed(2)).tolist()
    plain = [random_order[i : i + 16] for i in range(0, 997, 16)]
    assert padding(first) < 0.3 * padding(plain)

    again = LengthGroupedBatchSampler(
        RandomSampler(range(997), generator=torch.Generator().manual_seed(1)), 16, False, lengths, group_size=8, seed=3
    )
    assert list(again) == first  # reproducible from the seeds
    dropped = LengthGroupedBatchSampler(range(997), 16, True, lengths, group_size=8)
    assert all(len(b) == 16 for b in dropped) and len(list(dropped)) == len(dropped) == 62


def test_group_by_length_and_two_workers_in_a_fit(hub, tiny_encoder, tmp_path):
    dm = GlueDataModule("qnli", max_length=32, batch_size=8, group_by_length=True, length_group_size=2, num_workers=2)
    dm.tokenizer = None
    model = FineTuneModule(str(tiny_encoder), num_labels=2)
    trainer = quiet_trainer(tmp_path, max_steps=2, limit_val_batches=1, val_check_interval=2)
    trainer.fit(model, dm)
    loader = dm.train_dataloader()
    assert isinstance(loader.batch_sampler, LengthGroupedBatchSampler) and loader.num_workers == 2
    indices, spreads = [], []
    for batch in loader:
        indices += batch["index"].tolist()
        lengths = batch["attention_mask"].sum(-1)
        spreads.append(int(lengths.max() - lengths.min()))
    assert sorted(indices) == list(range(48))
    assert max(spreads) <= 16  # rows of a batch come from one length-sorted group of 16


@pytest.mark.parametrize("workers", [2])
def test_evaluation_loader_with_workers_keeps_the_order(hub, tiny_encoder, workers):
    dm = GlueDataModule("rte", tokenizer=str(tiny_encoder), batch_size=4, num_workers=workers)
    dm.setup("fit")
    labels = torch.cat([batch["labels"] for batch in dm.val_dataloader()])
    assert labels.tolist() == dm.datasets["validation"]["labels"]

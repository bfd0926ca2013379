"""TeacherCache: same outputs as the live teacher, keys that change with their inputs, atomic builds."""

from __future__ import annotations

import pytest
import torch
from helpers import csv_datamodule, distill_module, interrupt_cache_build, quiet_trainer

from kd_lightning import TapSpec
from kd_lightning.losses import CrossEntropy, KLDivergence, ProjectedMSE
from kd_lightning.teacher_cache import CacheRefusedError, TeacherCacheConfig

TAPS = {
    "t_cls": TapSpec("teacher", "bert.encoder.layer.1", "cls"),
    "t_tok": TapSpec("teacher", "bert.encoder.layer.0", "tokens"),
    "s_cls": TapSpec("student", "bert.encoder.layer.0", "cls"),
    "s_tok": TapSpec("student", "bert.encoder.layer.0", "tokens"),
}


def cached_module(teacher, root, **overrides):
    losses = [
        CrossEntropy(weight=0.5),
        KLDivergence(weight=0.5),
        ProjectedMSE("s_cls", "t_cls", name="mse_cls"),
        ProjectedMSE("s_tok", "t_tok", name="mse_tok"),
    ]
    kwargs = {"taps": TAPS, "losses": losses, "teacher_cache": TeacherCacheConfig(root=str(root))}
    kwargs.update(overrides)
    return distill_module(teacher, **kwargs)


def prepared(teacher, files, **data_overrides):
    data = csv_datamodule(files, tokenizer=str(teacher), **data_overrides)
    data.prepare_data()
    data.setup("fit")
    return data


def test_cached_outputs_and_losses_match_the_live_teacher(tiny_bert, tiny_csv, tmp_path):
    module = cached_module(tiny_bert, tmp_path / "cache")
    data = prepared(tiny_bert, tiny_csv)
    cache = module.open_teacher_cache(data)
    assert len(cache) == 96 and cache.meta["dtype"] == "float16"
    module.teacher_cache = cache
    module.eval()  # no dropout in the student, so live and cached terms are comparable
    batch = next(iter(data.train_dataloader()))  # shuffled: indices out of order
    live = module.teacher_outputs(batch)
    module.train()
    module.student.eval()
    from_cache = module.teacher_outputs(batch)
    torch.testing.assert_close(from_cache.logits, live.logits, atol=2e-3, rtol=2e-3)
    for name in ("t_cls", "t_tok"):
        assert from_cache.features[name].shape == live.features[name].shape
        torch.testing.assert_close(from_cache.features[name], live.features[name], atol=5e-3, rtol=5e-3)
    student = module.student_outputs(batch)
    live_terms = module.loss_terms(student, live, batch)
    cached_terms = module.loss_terms(student, from_cache, batch)
    for name, value in live_terms.items():
        torch.testing.assert_close(cached_terms[name], value, atol=2e-3, rtol=2e-3)


def test_fit_on_cache_never_runs_the_teacher_in_training(tiny_bert, tiny_csv, tmp_path):
    module = cached_module(tiny_bert, tmp_path / "cache")
    calls = []
    module.teacher.register_forward_hook(lambda m, a, o: calls.append(m.training))
    trainer = quiet_trainer(tmp_path, max_steps=4, val_check_interval=4, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=csv_datamodule(tiny_csv))
    built = len(calls)
    assert built > 0, "the cache build and the validation reference run the teacher"
    assert module.teacher_cache is not None
    calls.clear()
    module.log = lambda *a, **k: None
    batch = next(iter(trainer.datamodule.train_dataloader()))
    module.train()
    module.training_step(batch, 0)
    assert calls == []


def test_key_changes_with_teacher_data_and_settings(tiny_bert, tiny_bert_4layers, tiny_csv, tmp_path):
    root = tmp_path / "cache"
    folders = set()
    folders.add(cached_module(tiny_bert, root).open_teacher_cache(prepared(tiny_bert, tiny_csv)).folder)
    # same everything: the same folder, not rebuilt
    folders.add(cached_module(tiny_bert, root).open_teacher_cache(prepared(tiny_bert, tiny_csv)).folder)
    assert len(folders) == 1
    folders.add(cached_module(tiny_bert, root).open_teacher_cache(prepared(tiny_bert, tiny_csv, max_length=8)).folder)
    folders.add(
        cached_module(tiny_bert, root).open_teacher_cache(prepared(tiny_bert, tiny_csv, max_train_samples=50)).folder
    )
    float32 = cached_module(tiny_bert, root, teacher_cache=TeacherCacheConfig(root=str(root), dtype="float32"))
    folders.add(float32.open_teacher_cache(prepared(tiny_bert, tiny_csv)).folder)
    other_taps = dict(TAPS, t_cls=TapSpec("teacher", "bert.encoder.layer.1", "mean"))
    folders.add(
        cached_module(tiny_bert, root, taps=other_taps).open_teacher_cache(prepared(tiny_bert, tiny_csv)).folder
    )
    retrained = cached_module(tiny_bert, root)
    with torch.no_grad():
        retrained.teacher.classifier.bias.add_(0.5)
    folders.add(retrained.open_teacher_cache(prepared(tiny_bert, tiny_csv)).folder)
    assert len(folders) == 6


def test_interrupted_build_leaves_nothing_that_looks_complete(tiny_bert, tiny_csv, tmp_path):
    root = tmp_path / "cache"
    module = cached_module(tiny_bert, root)
    data = prepared(tiny_bert, tiny_csv)
    interrupt_cache_build(module, data, root)
    with pytest.raises(FileNotFoundError, match="no teacher cache"):
        cached_module(
            tiny_bert, root, teacher_cache=TeacherCacheConfig(root=str(root), build=False)
        ).open_teacher_cache(data)
    assert len(module.open_teacher_cache(data)) == 96


def test_randomised_inputs_and_raw_taps_refuse_the_cache(tiny_bert, tiny_csv, tmp_path):
    data = prepared(tiny_bert, tiny_csv)
    data.randomized_inputs = True
    with pytest.raises(CacheRefusedError, match="changes its inputs at random"):
        cached_module(tiny_bert, tmp_path).open_teacher_cache(data)
    raw = dict(TAPS, t_cls=TapSpec("teacher", "bert.encoder.layer.1", "none"))
    module = cached_module(tiny_bert, tmp_path, taps=raw, losses=[KLDivergence()])
    with pytest.raises(CacheRefusedError, match="reduce 'none'"):
        module.open_teacher_cache(prepared(tiny_bert, tiny_csv))


def test_classifier_caches_ignore_top_k_and_keep_their_keys(tiny_bert, tiny_csv, tmp_path):
    """``top_k`` concerns vocabulary-sized outputs only: a classifier cache stores every class, and
    its key is the one it had before top-k caches existed, so existing caches stay valid."""
    import hashlib
    import json

    from kd_lightning.models import parameter_fingerprint
    from kd_lightning.teacher_cache import DamagedCacheError, TopKTeacherCache
    from kd_lightning.teacher_pass import training_split

    root = tmp_path / "cache"
    data = prepared(tiny_bert, tiny_csv)
    module = cached_module(tiny_bert, root)
    cache = module.open_teacher_cache(data)
    few = cached_module(tiny_bert, root, teacher_cache=TeacherCacheConfig(root=str(root), top_k=1, batch_size=7))
    assert few.open_teacher_cache(data).folder == cache.folder and cache.logits.shape == (96, 2)
    dataset, _ = training_split(data)
    spec = sorted((n, t.path, t.reduce) for n, t in TAPS.items() if t.module == "teacher")
    body = json.dumps([dataset._fingerprint, parameter_fingerprint(module.teacher), spec, "float16"])
    assert cache.folder.name == hashlib.sha256(body.encode()).hexdigest()[:24]
    with pytest.raises(DamagedCacheError, match="layout 'logits' where TopKTeacherCache reads 'topk'"):
        TopKTeacherCache(cache.folder)


@pytest.mark.parametrize(
    "settings,message",
    [
        ({"top_k": 0}, "top_k must be a positive number of tokens"),
        ({"dtype": "bfloat16"}, "dtype must be one of float16, float32"),
        ({"batch_size": 0}, "batch_size must be a positive number of examples or null"),
    ],
)
def test_cache_settings_are_checked_when_the_config_is_read(settings, message):
    with pytest.raises(ValueError, match=message):
        TeacherCacheConfig(**settings)

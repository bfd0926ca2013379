"""The teacher's forward pass replayed from CUDA graphs: the same outputs as the eager pass (every
tap reduction, dynamic shapes, bf16 autocast), outputs that later replays leave alone, the graph
limit, moves that invalidate graphs, a whole fit equal to the eager fit; and the set-ups that are
refused, with the fix in the message."""

from __future__ import annotations

import pytest
import torch
from helpers import csv_datamodule, distill_module, quiet_trainer

from kd_lightning import DistillModule, TapSpec
from kd_lightning.cuda_graphs import CudaGraphConfig, GraphedForward
from kd_lightning.losses import CrossEntropy, KLDivergence, ProjectedMSE
from kd_lightning.taps import FeatureTaps
from kd_lightning.training import model_inputs

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

#: one tap per reduction on the teacher, so every reduction passes through the graphed path
TEACHER_TAPS = {
    "t_cls": TapSpec("teacher", "bert.encoder.layer.1", "cls"),
    "t_mean": TapSpec("teacher", "bert.encoder.layer.0", "mean"),
    "t_tokens": TapSpec("teacher", "bert.encoder.layer.1", "tokens"),
    "t_none": TapSpec("teacher", "bert.embeddings", "none"),
    "t_input": TapSpec("teacher", "classifier", "none", capture="input"),
    "s_last": TapSpec("student", "bert.encoder.layer.0", "mean"),
}


def graphed_module(tiny_bert, **config) -> DistillModule:
    return distill_module(
        tiny_bert,
        taps=TEACHER_TAPS,
        losses=[CrossEntropy(weight=0.5), KLDivergence(weight=0.5), ProjectedMSE(student="s_last", teacher="t_cls", weight=0.1)],
        teacher_cuda_graphs=CudaGraphConfig(**config),
    )


def batches(module: DistillModule, lengths: list[int], batch_size: int = 4, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Batches of random token ids, padded to each of ``lengths``, the rows of varying real length."""
    generator = torch.Generator().manual_seed(seed)
    vocab = module.teacher.config.vocab_size
    out = []
    for length in lengths:
        real = torch.randint(1, length + 1, (batch_size,), generator=generator)
        real[0] = length
        mask = (torch.arange(length)[None] < real[:, None]).long()
        ids = torch.randint(5, vocab, (batch_size, length), generator=generator) * mask
        out.append({"input_ids": ids.cuda(), "attention_mask": mask.cuda(), "token_type_ids": torch.zeros_like(ids).cuda()})
    return out


def eager_outputs(module: DistillModule, batch):
    graphs, module.teacher_graphs = module.teacher_graphs, None
    try:
        return module.teacher_outputs(batch)
    finally:
        module.teacher_graphs = graphs


def assert_same_outputs(got, expected, **tolerance) -> None:
    torch.testing.assert_close(got.logits, expected.logits, **tolerance)
    assert got.features.keys() == expected.features.keys()
    for name in expected.features:
        torch.testing.assert_close(got.features[name], expected.features[name], **tolerance, msg=name)
    assert got.attention_mask is expected.attention_mask


def on_gpu(module: DistillModule) -> DistillModule:
    module.cuda().train()
    module.teacher_graphs = module.make_teacher_graphs(torch.device("cuda"))
    return module


# ---- on a GPU -----------------------------------------------------------------------------------------
@cuda
def test_graphed_teacher_equals_the_eager_teacher_for_every_reduction_and_shape(tiny_bert):
    module = on_gpu(graphed_module(tiny_bert))
    lengths = [7, 12, 7, 16, 12, 7]
    for batch in batches(module, lengths):
        assert_same_outputs(module.teacher_outputs(batch), eager_outputs(module, batch), rtol=1e-5, atol=1e-5)
    graphs = module.teacher_graphs
    assert len(graphs.graphs) == 3, "one graph per padded length"
    assert graphs.replays == len(lengths) and graphs.eager_calls == 0
    tokens = module.teacher_outputs(batches(module, [9])[0]).features["t_tokens"]
    assert tokens.shape[0] == int(batches(module, [9])[0]["attention_mask"].sum()), "tokens: one row per real token"


@cuda
def test_a_capture_keeps_the_allocator_cache(tiny_bert):
    """A new shape's capture does not empty the caching allocator (``torch.cuda.graph`` would),
    so the training step after it does not allocate its working set again."""
    module = on_gpu(graphed_module(tiny_bert))
    first, second = batches(module, [6, 14])
    module.teacher_outputs(first)
    block = torch.empty(64 * 2**20, dtype=torch.uint8, device="cuda")
    del block  # 64 MiB now sits free in the allocator's cache
    reserved = torch.cuda.memory_reserved()
    module.teacher_outputs(second)
    assert module.teacher_graphs.captures == 2
    assert torch.cuda.memory_reserved() >= reserved


@cuda
def test_replayed_outputs_are_copies_that_later_replays_leave_alone(tiny_bert):
    module = on_gpu(graphed_module(tiny_bert))
    first, second = batches(module, [10, 10], seed=3)
    held = module.teacher_outputs(first)
    kept = held.logits.clone(), {k: v.clone() for k, v in held.features.items()}
    module.teacher_outputs(second)  # the same graph, other inputs
    torch.testing.assert_close(held.logits, kept[0], rtol=0, atol=0)
    for name, value in kept[1].items():
        torch.testing.assert_close(held.features[name], value, rtol=0, atol=0)
    assert not torch.equal(held.logits, module.teacher_outputs(second).logits)


@cuda
def test_new_shapes_beyond_max_graphs_run_eagerly_with_one_warning(tiny_bert):
    module = on_gpu(graphed_module(tiny_bert, max_graphs=1))
    data = batches(module, [8, 11, 13, 8])
    with pytest.warns(UserWarning, match="max_graphs") as caught:
        outputs = [module.teacher_outputs(batch) for batch in data]
    assert len([w for w in caught if "max_graphs" in str(w.message)]) == 1
    for batch, got in zip(data, outputs, strict=True):
        assert_same_outputs(got, eager_outputs(module, batch), rtol=1e-5, atol=1e-5)
    assert len(module.teacher_graphs.graphs) == 1
    assert module.teacher_graphs.replays == 2 and module.teacher_graphs.eager_calls == 2


@cuda
def test_moving_the_module_drops_the_graphs(tiny_bert):
    module = on_gpu(graphed_module(tiny_bert))
    (batch,) = batches(module, [9])
    module.teacher_outputs(batch)
    assert len(module.teacher_graphs.graphs) == 1
    module.cpu()
    assert not module.teacher_graphs.graphs and module.teacher_graphs.captures == 1
    module.cuda()
    assert_same_outputs(module.teacher_outputs(batch), eager_outputs(module, batch), rtol=1e-5, atol=1e-5)


@cuda
def test_bf16_autocast_gets_its_own_graph_and_matches_eager_autocast(tiny_bert):
    module = on_gpu(graphed_module(tiny_bert))
    (batch,) = batches(module, [12])
    float32 = module.teacher_outputs(batch)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = module.teacher_outputs(batch)
        expected = eager_outputs(module, batch)
    assert got.logits.dtype == torch.bfloat16 and float32.logits.dtype == torch.float32
    assert len(module.teacher_graphs.graphs) == 2, "fp32 and bf16 autocast are different graphs"
    assert_same_outputs(got, expected, rtol=2e-2, atol=2e-2)


@cuda
def test_a_fit_with_graphs_equals_the_eager_fit(tiny_bert, tiny_csv, tmp_path):
    results = []
    for graphs in (None, CudaGraphConfig()):
        torch.manual_seed(0)
        module = distill_module(tiny_bert, teacher_cuda_graphs=graphs)
        losses: list[float] = []
        module.on_train_batch_end = lambda outputs, batch, batch_idx, losses=losses: losses.append(float(outputs["loss"]))
        trainer = quiet_trainer(tmp_path / str(graphs is None), accelerator="gpu", devices=1, max_steps=6, limit_val_batches=0)
        trainer.fit(module, datamodule=csv_datamodule(tiny_csv))
        results.append((losses, [p.detach().cpu() for p in module.student.parameters()], module))
    (eager_losses, eager_params, _), (graph_losses, graph_params, graphed) = results
    assert graphed.teacher_graphs is not None and graphed.teacher_graphs.replays == 6
    assert not graphed.teacher_graphs.graphs, "the fit's end moved the module to the CPU, which drops the graphs"
    assert 1 <= graphed.teacher_graphs.captures <= 6
    torch.testing.assert_close(torch.tensor(graph_losses), torch.tensor(eager_losses), rtol=1e-4, atol=1e-5)
    for a, b in zip(graph_params, eager_params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@cuda
def test_fsdp_teacher_is_refused(tiny_bert, tiny_csv, tmp_path):
    from kd_lightning.strategies import DistillFSDPStrategy

    module = distill_module(tiny_bert, teacher_cuda_graphs=CudaGraphConfig())
    trainer = quiet_trainer(tmp_path, accelerator="gpu", devices=1, strategy=DistillFSDPStrategy(), limit_val_batches=0)
    with pytest.raises(ValueError, match="FSDP-sharded teacher.*ddp strategy"):
        trainer.fit(module, datamodule=csv_datamodule(tiny_csv))


# ---- everywhere -----------------------------------------------------------------------------------------
def test_a_cpu_run_is_refused_with_the_fix(tiny_bert, tiny_csv, tmp_path):
    module = distill_module(tiny_bert, teacher_cuda_graphs=CudaGraphConfig())
    with pytest.raises(ValueError, match=r"needs a CUDA device, and this run is on cpu.*trainer.accelerator: gpu"):
        quiet_trainer(tmp_path).fit(module, datamodule=csv_datamodule(tiny_csv))


def test_the_shipped_gpu_config_builds_graphs_and_padding(tiny_bert, tiny_csv, tmp_path):
    """``configs/scale/gpu_graphs.yaml`` with the tiny teacher and data: the module gets its graph
    settings, the data pads to multiples of 8, and on the CPU the fit is refused with the fix."""
    from pathlib import Path

    from kd_lightning.cli import KDLightningCLI

    config = Path(__file__).resolve().parents[1] / "configs" / "scale" / "gpu_graphs.yaml"
    cli = KDLightningCLI(
        run=False,
        args=[
            "--config", str(config),
            f"--model.init_args.teacher.name_or_path={tiny_bert}",
            "--model.init_args.student.from_teacher_layers=[0, 1]",
            "--data.init_args.dataset=null",
            f"--data.init_args.data_files={tiny_csv}",
            "--data.init_args.max_length=16",
            "--trainer.accelerator=cpu",
            f"--trainer.default_root_dir={tmp_path}",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            f"--trainer.callbacks.init_args.dirpath={tmp_path / 'export'}",
        ],
    )  # fmt: skip
    assert cli.model.teacher_cuda_graphs == CudaGraphConfig(max_graphs=64)
    assert cli.datamodule.pad_to_multiple_of == 8
    with pytest.raises(ValueError, match="needs a CUDA device, and this run is on cpu"):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)


def test_graphs_and_the_teacher_cache_are_refused_together(tiny_bert):
    from kd_lightning.teacher_cache import TeacherCacheConfig

    with pytest.raises(ValueError, match="teacher_cache and teacher_cuda_graphs.*keep one"):
        distill_module(tiny_bert, teacher_cache=TeacherCacheConfig(), teacher_cuda_graphs=CudaGraphConfig())


def test_a_trained_teacher_is_refused(tiny_bert):
    module = distill_module(tiny_bert, teacher_cuda_graphs=CudaGraphConfig())
    module.teacher_is_trainable = lambda: True
    with pytest.raises(ValueError, match="trains its teacher.*remove teacher_cuda_graphs"):
        module.make_teacher_graphs(torch.device("cuda"))


@pytest.mark.parametrize(
    "config,message",
    [({"max_graphs": 0}, "max_graphs must be a positive"), ({"warmup_steps": 0}, "warmup_steps must be at least 1")],
)
def test_config_checks(config, message):
    with pytest.raises(ValueError, match=message):
        CudaGraphConfig(**config)


def test_cpu_tensors_are_refused_before_anything_runs():
    calls = []
    graphed = GraphedForward(lambda inputs: calls.append(inputs), CudaGraphConfig())
    with pytest.raises(ValueError, match=r"inputs \['input_ids'\] are not: move the batch to the GPU"):
        graphed({"input_ids": torch.zeros(2, 3, dtype=torch.long)})
    assert not calls and not graphed.graphs


def test_the_signature_tells_shapes_dtypes_and_autocast_apart():
    ids = {"input_ids": torch.zeros(2, 3, dtype=torch.long), "attention_mask": torch.ones(2, 3)}
    same = {"attention_mask": torch.zeros(2, 3), "input_ids": torch.ones(2, 3, dtype=torch.long)}
    assert GraphedForward.signature(ids) == GraphedForward.signature(same), "values and key order do not matter"
    longer = {k: torch.zeros(2, 4, dtype=v.dtype) for k, v in ids.items()}
    other_dtype = {**ids, "attention_mask": torch.ones(2, 3, dtype=torch.long)}
    assert len({GraphedForward.signature(x) for x in (ids, longer, other_dtype)}) == 3


def test_take_then_reduce_equals_collect(tiny_bert):
    module = graphed_module(tiny_bert)
    taps = FeatureTaps(module.teacher, TEACHER_TAPS, "teacher")
    ids = torch.tensor([[2, 7, 9, 3, 0], [2, 8, 3, 0, 0]])
    batch = {"input_ids": ids, "attention_mask": (ids > 0).long()}
    with torch.no_grad():
        module.teacher(**model_inputs(batch))
        collected = taps.collect(batch["attention_mask"])
        module.teacher(**model_inputs(batch))
        raw = taps.take()
    assert set(raw) == set(taps) and raw["t_tokens"].shape == (2, 5, module.teacher.config.hidden_size)
    reduced = taps.reduce(raw, batch["attention_mask"])
    for name, value in collected.items():
        torch.testing.assert_close(reduced[name], value, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="captured nothing"):
        taps.take()

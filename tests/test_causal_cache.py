"""Top-k teacher cache of causal LMs: what is stored, how rows are rebuilt, keys, refusals, the CLI."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import interrupt_cache_build
from loss_testing import one_thread  # noqa: F401
from test_cli import scalars

from kd_lightning import StudentSpec, TapSpec, TeacherSpec
from kd_lightning import topk_logprobs as topk_module
from kd_lightning.causal import CausalLMDistillModule, SpeculativeKDModule
from kd_lightning.causal.module import response_token_mask
from kd_lightning.cli import main
from kd_lightning.data import InstructionDataModule
from kd_lightning.losses import (
    DIST,
    DKD,
    BalancedDivergence,
    DistillLoss,
    JSDivergence,
    KLDivergence,
    NextTokenCrossEntropy,
    Procrustes,
    ReverseKLDivergence,
    SinkhornDistance,
    SkewKLDivergence,
    SkewReverseKLDivergence,
    TotalVariationDistance,
)
from kd_lightning.teacher_cache import CacheRefusedError, DamagedCacheError, TeacherCacheConfig, check_topk_losses
from kd_lightning.topk_logprobs import TopKCacheError, TopKLogProbs, reconstruct_log_probs, top_k_log_probs

pytest_plugins = ("causal_fixtures",)
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: no OpenMP spin-waits on 2 shared cores

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "causal_lm" / "quick_smollm2_cached.yaml"
TAPS = {
    "t_tok": TapSpec("teacher", "model.layers.2", "tokens"),
    "s_tok": TapSpec("student", "model.layers.0", "tokens"),
    "t_mean": TapSpec("teacher", "model.layers.1", "mean"),
    "s_mean": TapSpec("student", "model.layers.0", "mean"),
}
STUDENT = StudentSpec(config_overrides={"num_hidden_layers": 1})  # random weights: far from the teacher


def divergences(chunk_size: int | None) -> list[DistillLoss]:
    """Every row-wise divergence over the vocabulary, named by its chunking."""
    tag = "all" if chunk_size is None else f"c{chunk_size}"
    return [
        KLDivergence(temperature=2.0, chunk_size=chunk_size, name=f"kl_{tag}"),
        ReverseKLDivergence(temperature=1.5, chunk_size=chunk_size, name=f"rkl_{tag}"),
        JSDivergence(chunk_size=chunk_size, name=f"js_{tag}"),
        TotalVariationDistance(chunk_size=chunk_size, name=f"tvd_{tag}"),
        SkewKLDivergence(chunk_size=chunk_size, name=f"skl_{tag}"),
        SkewReverseKLDivergence(chunk_size=chunk_size, name=f"srkl_{tag}"),
        BalancedDivergence(mode="soft", chunk_size=chunk_size, name=f"bd_{tag}"),
    ]


def cached_module(
    teacher: Path, root: Path, losses: list[DistillLoss] | None = None, taps=TAPS, **cache
) -> CausalLMDistillModule:
    losses = losses or [NextTokenCrossEntropy(chunk_size=4), KLDivergence(chunk_size=4)]
    config = TeacherCacheConfig(root=str(root), **cache)
    return CausalLMDistillModule(TeacherSpec(str(teacher)), STUDENT, losses, taps=taps, teacher_cache=config)


def instruction_data(teacher: Path, files: dict[str, str], **overrides) -> InstructionDataModule:
    kwargs = {"data_files": files, "tokenizer": str(teacher), "max_length": 40, "batch_size": 4, **overrides}
    data = InstructionDataModule(**kwargs)
    data.setup("fit")
    return data


def live_and_cached(module: CausalLMDistillModule, batch):
    """The live teacher's outputs (eval mode) and the cached ones (training mode, student without dropout)."""
    module.eval()
    live = module.teacher_outputs(batch)
    module.train()
    module.student.eval()
    return live, module.teacher_outputs(batch)


# ---- the pure parts: what is stored, how a row is rebuilt, how rows are handed out -----------------
def test_stored_entries_are_torch_topk_of_the_log_softmax_and_the_exact_remaining_mass():
    logits = 3 * torch.randn(7, 13, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    logits[0, :4] = 40.0  # top-4 hold all but ~1e-16 of the mass: 1 - sum would cancel to 0
    for k in (1, 4, 12, 13):
        values, indices, log_rest = top_k_log_probs(logits, k)
        expected = torch.topk(torch.log_softmax(logits, -1), k)
        assert torch.equal(indices, expected.indices) and torch.equal(values, expected.values)
        for r in range(logits.shape[0]):
            p = torch.softmax(logits[r], -1).tolist()
            rest = [p[j] for j in range(13) if j not in set(indices[r].tolist())]
            if k == 13:
                assert log_rest[r] == float("-inf")
            else:
                assert float(log_rest[r]) == pytest.approx(math.log(math.fsum(rest)), rel=1e-12)
    tail = float(top_k_log_probs(logits, 4)[2][0])  # ~1e-15 of the mass: 1 - sum(top-4) is mostly rounding
    assert (
        tail == pytest.approx(math.log(math.fsum(torch.softmax(logits[0], -1)[4:].tolist())), rel=1e-12) and tail < -30
    )


def test_reconstructed_rows_keep_the_top_k_spread_the_rest_evenly_and_sum_to_one():
    vocab = 11
    logits = 2 * torch.randn(5, vocab, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for k in (1, 3, 10, vocab):
        rows = reconstruct_log_probs(*top_k_log_probs(logits, k), vocab)
        torch.testing.assert_close(rows.exp().sum(-1), torch.ones(5, dtype=torch.float64), rtol=0, atol=1e-12)
        for r in range(5):
            p = torch.softmax(logits[r], -1).tolist()
            top = sorted(range(vocab), key=lambda j: -p[j])[:k]
            rest = math.fsum(p[j] for j in range(vocab) if j not in top)
            for j in range(vocab):
                expected = p[j] if j in top else rest / (vocab - k)
                assert math.exp(float(rows[r, j])) == pytest.approx(expected, rel=1e-10, abs=1e-300)
    torch.testing.assert_close(rows, torch.log_softmax(logits, -1), rtol=0, atol=1e-12)  # k = V: the teacher itself


def test_a_top_k_row_source_hands_out_rows_only_and_never_uncached_positions():
    mask = torch.tensor([[False, True, True, False], [True, False, False, False]])
    logits = torch.randn(3, 6, generator=torch.Generator().manual_seed(2))
    source = TopKLogProbs(*top_k_log_probs(logits, 2), mask, 6)
    assert source.shape == (2, 4, 6) and source.dim() == 3
    flat = source.reshape(-1, 6)
    expected = reconstruct_log_probs(*top_k_log_probs(logits, 2), 6)
    torch.testing.assert_close(flat.index_select(0, torch.tensor([4, 1, 2])), expected[[2, 0, 1]])
    torch.testing.assert_close(source[mask], expected)
    torch.testing.assert_close(flat[1:3], expected[:2])
    assert flat[:0].shape == (0, 6)
    with pytest.raises(TopKCacheError, match="reshape only to"):
        source.reshape(-1, 5)
    with pytest.raises(TopKCacheError, match="does not hold.*labels != -100"):
        flat.index_select(0, torch.tensor([0]))
    with pytest.raises(TopKCacheError, match="softmax.*top-k teacher cache"):
        torch.softmax(source, -1)
    with pytest.raises(AttributeError, match="'exp' is not available.*top-k teacher cache"):
        source.exp()


# ---- the cache of a tiny causal LM -----------------------------------------------------------------
def test_a_top_k_cache_stores_response_positions_only_and_its_loss_is_the_divergence_from_the_rebuilt_rows(
    tiny_llama, instruction_files, tmp_path, monkeypatch
):
    k, temperature, chunk = 5, 2.0, 3
    module = cached_module(
        tiny_llama, tmp_path, [KLDivergence(temperature=temperature, chunk_size=chunk)], top_k=k, dtype="float32"
    )
    data = instruction_data(tiny_llama, instruction_files)
    cache = module.teacher_cache = module.open_teacher_cache(data)

    # what is stored: the live teacher's top-k and remaining mass, at the positions that predict a response token
    train = data.datasets["train"]
    responses = [sum(1 for y in labels[1:] if y != -100) for labels in train["labels"]]
    assert np.diff(cache.token_offsets).tolist() == responses, "one row per position that predicts a response token"
    assert cache.meta["num_tokens"] == sum(responses) < sum(len(ids) for ids in train["input_ids"]) - len(train)
    assert cache.features["t_tok"].shape == (sum(responses), 32) and cache.features["t_mean"].shape == (len(train), 32)
    for row in (0, 17, len(train) - 1):
        example = train[row]
        assert cache.rows_of(torch.tensor([example["index"]])).tolist() == [row]
        with torch.no_grad():
            logits = module.teacher(input_ids=torch.tensor([example["input_ids"]])).logits[0].double()
        positions = [i for i in range(len(example["labels"]) - 1) if example["labels"][i + 1] != -100]
        top = torch.topk(torch.log_softmax(logits[positions], -1), k)
        start, end = cache.token_offsets[row], cache.token_offsets[row + 1]
        torch.testing.assert_close(
            torch.tensor(cache.top_logprobs[start:end]).double(), top.values, rtol=1e-5, atol=1e-5
        )
        assert np.array_equal(cache.top_indices[start:end], top.indices.numpy())
        rest = [math.log(1 - math.fsum(math.exp(v) for v in values)) for values in top.values.tolist()]
        np.testing.assert_allclose(cache.rest_logprob[start:end], rest, rtol=1e-4)

    # what a step computes: KL from the rebuilt rows (top-k exact, the rest spread evenly), a chunk at a time
    batch = next(iter(data.train_dataloader()))
    live, cached = live_and_cached(module, batch)
    rebuilt = []
    original = topk_module.reconstruct_log_probs
    monkeypatch.setattr(
        topk_module, "reconstruct_log_probs", lambda *a: rebuilt.append(a[0].shape[0]) or original(*a)
    )
    student = module.student_outputs(batch)
    got = float(module.loss_terms(student, cached, batch)["kl_divergence"].detach())
    mask = response_token_mask(batch["labels"])
    assert max(rebuilt) <= chunk and sum(rebuilt) == int(mask.sum()), "teacher rows are rebuilt a chunk at a time"
    vocab, values = module.num_labels, []
    for b, i in mask.nonzero().tolist():  # the documented rule in float64, from the live teacher
        p = torch.softmax(live.logits[b, i].double(), -1).tolist()
        top_k = sorted(range(vocab), key=lambda j: -p[j])[:k]
        rest = math.fsum(p[j] for j in range(vocab) if j not in top_k)
        q = [(p[j] if j in top_k else rest / (vocab - k)) ** (1 / temperature) for j in range(vocab)]
        q = [x / math.fsum(q) for x in q]
        s = torch.softmax(student.logits[b, i].detach().double() / temperature, -1).tolist()
        values.append(temperature**2 * math.fsum(a * (math.log(a) - math.log(c)) for a, c in zip(q, s, strict=True)))
    assert got == pytest.approx(sum(values) / len(values), rel=1e-4)
    exact = float(module.loss_terms(student, live, batch)["kl_divergence"].detach())
    assert got != pytest.approx(exact, rel=1e-4), "the flattened tail changes the loss when k < V"


def test_with_k_equal_to_the_vocabulary_cached_losses_and_gradients_equal_the_live_ones(
    tiny_llama, instruction_files, tmp_path
):
    features = [
        Procrustes("s_tok", "t_tok", name="procrustes_tokens"),
        Procrustes("s_mean", "t_mean", name="procrustes_mean"),
    ]
    losses = [NextTokenCrossEntropy(chunk_size=4), *divergences(3), *divergences(None), *features]
    # TVD's gradient, sign(p_s - p_t), jumps where the two are close: its value is compared, not its gradient
    smooth = [loss.name for loss in losses if loss.name.split("_")[0] in ("kl", "rkl", "js", "skl", "srkl", "bd")]
    module = cached_module(tiny_llama, tmp_path, losses)
    data = instruction_data(tiny_llama, instruction_files, padding_side="left")
    batch = next(iter(data.train_dataloader()))  # shuffled, padded unlike the building pass
    for dtype, rtol, atol, grad_tol in (("float32", 2e-5, 1e-6, 1e-4), ("float16", 5e-3, 2e-4, 1e-2)):
        module.teacher_cache_config = TeacherCacheConfig(root=str(tmp_path), top_k=10_000, dtype=dtype)  # k >= V: all
        module.teacher_cache = module.open_teacher_cache(data)
        assert module.teacher_cache.top_k == module.num_labels == 47
        live, cached = live_and_cached(module, batch)
        assert isinstance(cached.logits, TopKLogProbs) and cached.logits.shape == live.logits.shape
        for name in ("t_tok", "t_mean"):
            torch.testing.assert_close(cached.features[name], live.features[name], rtol=5e-3, atol=5e-3)
        student = module.student_outputs(batch)
        live_terms = module.loss_terms(student, live, batch)
        cached_terms = module.loss_terms(student, cached, batch)
        for name, value in live_terms.items():
            assert float(value.detach()) > 1e-3 or name.startswith("procrustes"), f"{name}: too small to compare"
            torch.testing.assert_close(cached_terms[name], value, rtol=rtol, atol=atol, msg=f"{dtype} {name}")
        grads = [
            torch.autograd.grad(sum(terms[n] for n in smooth), student.logits, retain_graph=True)[0]
            for terms in (live_terms, cached_terms)
        ]
        assert torch.isfinite(grads[1]).all()
        torch.testing.assert_close(grads[1], grads[0], rtol=grad_tol, atol=grad_tol * grads[0].abs().max().item())


def test_the_key_changes_with_k_dtype_tokenisation_and_teacher_weights(tiny_llama, instruction_files, tmp_path):
    root = tmp_path / "caches"
    module = cached_module(tiny_llama, root, top_k=8)
    lengths = {"max_length": 80, "max_prompt_length": 60}  # room for the plain template's prompts
    data = instruction_data(tiny_llama, instruction_files, **lengths)

    def folder(config: TeacherCacheConfig | None = None, data=data) -> Path:
        module.teacher_cache_config = config or TeacherCacheConfig(root=str(root), top_k=8)
        return module.open_teacher_cache(data).folder

    base = folder()
    assert folder() == base, "the same settings reopen the same cache"
    assert folder(TeacherCacheConfig(root=str(root), top_k=100)) == folder(TeacherCacheConfig(root=str(root), top_k=47))
    changed = {
        "k": folder(TeacherCacheConfig(root=str(root), top_k=9)),
        "dtype": folder(TeacherCacheConfig(root=str(root), top_k=8, dtype="float32")),
        "max_length": folder(data=instruction_data(tiny_llama, instruction_files, max_length=70, max_prompt_length=60)),
        "template": folder(data=instruction_data(tiny_llama, instruction_files, template="plain", **lengths)),
    }
    with torch.no_grad():
        module.teacher.model.norm.weight.mul_(1.5)
    changed["teacher weights"] = folder()
    assert base not in changed.values() and len(set(changed.values())) == len(changed), changed
    assert len(list(root.iterdir())) == len(changed) + 2  # + base + the k >= V cache


def test_an_interrupted_build_leaves_no_complete_looking_cache(tiny_llama, instruction_files, tmp_path):
    root = tmp_path / "caches"
    module = cached_module(tiny_llama, root)
    data = instruction_data(tiny_llama, instruction_files)
    interrupt_cache_build(module, data, root)
    module.teacher_cache_config = TeacherCacheConfig(root=str(root), build=False)
    with pytest.raises(FileNotFoundError, match="no teacher cache.*python -m kd_lightning cache"):
        module.open_teacher_cache(data)
    module.teacher_cache_config = TeacherCacheConfig(root=str(root))
    assert len(module.open_teacher_cache(data)) == 48


def test_configs_the_cache_cannot_serve_are_refused_with_the_fix(tiny_llama, instruction_files, tmp_path):
    for loss in (DIST(), DKD(), SinkhornDistance()):
        with pytest.raises(CacheRefusedError, match=rf"{loss.name} \({type(loss).__name__}\).*Remove teacher_cache"):
            cached_module(tiny_llama, tmp_path, [loss])

    class Opted(DistillLoss):
        accepts_topk_teacher = True

    class OptedOut(KLDivergence):
        accepts_topk_teacher = False

    check_topk_losses([Opted(), NextTokenCrossEntropy(), KLDivergence(), Procrustes("s", "t")])
    with pytest.raises(CacheRefusedError, match="opted_out"):
        check_topk_losses([OptedOut()])

    data = instruction_data(tiny_llama, instruction_files)
    data.randomized_inputs = True
    module = cached_module(tiny_llama, tmp_path, [KLDivergence(chunk_size=4, mask_key="attention_mask")])
    with pytest.raises(CacheRefusedError, match="changes its inputs at random"):
        module.open_teacher_cache(data)
    data.randomized_inputs = False
    module.teacher_cache = module.open_teacher_cache(data)
    batch = next(iter(data.train_dataloader()))
    live, cached = live_and_cached(module, batch)
    with pytest.raises(TopKCacheError, match="does not hold.*Drop the loss's mask_key"):
        module.loss_terms(module.student_outputs(batch), cached, batch)
    mask = response_token_mask(batch["labels"])
    with pytest.raises(IndexError, match="not in the teacher cache.*another split"):
        module.teacher_cache.read(torch.tensor([10**6]), token_mask=mask[:1])
    mask[0, mask[0].nonzero()[0]] = False  # a batch whose responses no longer match what was cached
    with pytest.raises(DamagedCacheError, match="response positions where the teacher cache.*Delete"):
        module.teacher_cache.read(batch["index"], token_mask=mask)

    first = {
        "t_first": TapSpec("teacher", "model.layers.2", "cls"),
        "s_first": TapSpec("student", "model.layers.0", "cls"),
    }
    with pytest.raises(CacheRefusedError, match="reduce \\['cls'\\].*mean, tokens"):
        cached_module(tiny_llama, tmp_path, taps=first).open_teacher_cache(data)

    speculative = SpeculativeKDModule(TeacherSpec(str(tiny_llama)), STUDENT, [KLDivergence(chunk_size=4)])
    speculative.teacher_cache_config = TeacherCacheConfig(root=str(tmp_path))
    with pytest.raises(CacheRefusedError, match="samples during training.*remove teacher_cache"):
        speculative.open_teacher_cache(data)


# ---- the command line ------------------------------------------------------------------------------
def test_the_cache_command_builds_with_a_progress_bar_and_fit_trains_on_it(
    tiny_llama, instruction_files, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "caches"
    overrides = [
        f"--model.init_args.teacher.name_or_path={tiny_llama}",
        "--model.init_args.student.from_teacher_layers=[0]",
        f"--model.init_args.teacher_cache.root={root}",
        "--data.init_args.dataset=null",
        f"--data.init_args.data_files={instruction_files}",
        "--data.init_args.max_length=40",
        "--data.init_args.max_prompt_length=24",
        "--trainer.callbacks.init_args.num_prompts=2",
        "--trainer.callbacks.init_args.max_new_tokens=3",
    ]
    cache = main(["cache", "--config", str(CONFIG), *overrides])
    printed = capsys.readouterr().out
    assert "Caching teacher top-k log-probabilities (48 examples)" in printed and "100%" in printed
    assert (
        f"teacher cache: {cache.folder} (48 examples, float16, top-47 of 47" in printed and "bytes per token" in printed
    )
    assert cache.folder.parent == root and cache.meta["layout"] == "topk"
    built = sorted(root.iterdir())

    fit = [
        "--trainer.max_steps=3",
        "--trainer.max_epochs=1",
        "--trainer.log_every_n_steps=1",
        "--trainer.limit_val_batches=1",
    ]
    main(["fit", "--config", str(CONFIG), *overrides, *fit, "--trainer.num_sanity_val_steps=0"])
    assert sorted(root.iterdir()) == built, "fit read the cache the command built"
    (run,) = [d for d in (tmp_path / "runs" / "causal_lm_quick_cached").iterdir() if list(d.glob("events.*"))]
    logged = scalars(str(run))
    assert len(logged["train/loss/kl_divergence"]) == 3 and all(
        math.isfinite(v) for v in logged["train/loss/kl_divergence"]
    )

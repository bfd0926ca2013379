"""EmbedDistill: recall@k, the score-distillation, embedding-matching and contrastive losses, the retrieval data."""

from __future__ import annotations

import math
import random
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from conftest import WORDS
from helpers import fit_config
from test_cli import scalars

from kd_lightning import ModelOutputs, StudentSpec, TeacherSpec
from kd_lightning.cli import main
from kd_lightning.data import PACKAGED_RETRIEVAL_SETS, RecallAtK, RetrievalDataModule, materialize_packaged
from kd_lightning.methods import EmbeddingMatching, EmbedDistillModule, InBatchContrastive, ScoreDistillation

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "retrieval" / "embed_distill.yaml"


def write_tiny_encoder(folder: Path, layers: int = 2, hidden: int = 32, seed: int = 0) -> Path:
    """A random BERT encoder (no head) with a WordPiece tokenizer over the test words."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    vocab = {token: i for i, token in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    tokenizer = BertTokenizerFast(vocab=vocab, do_lower_case=True)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
        intermediate_size=37, max_position_embeddings=64,
    )  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def pair_rows(n: int, seed: int) -> list[dict[str, str]]:
    """Questions of 2-3 words, each answered by a text that repeats them among other words; every
    fifth answer is shared by two questions (an FAQ answer)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = rng.sample(WORDS, rng.randint(2, 3))
        answer = " ".join(words + rng.sample(WORDS, 4))
        if i % 5 == 4:
            answer = rows[-1]["answer"]
        rows.append({"question": " ".join(words), "answer": answer})
    return rows


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_encoder(tmp_path_factory.mktemp("retrieval_encoder"))


@pytest.fixture(scope="module")
def pair_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("pairs")
    files = {}
    for seed, (split, n) in enumerate((("train", 48), ("validation", 20), ("test", 20))):
        files[split] = str(folder / f"{split}.csv")
        pd.DataFrame(pair_rows(n, seed)).to_csv(files[split], index=False)
    return files


def pair_data(files: dict[str, str], encoder: Path, **overrides) -> RetrievalDataModule:
    kwargs = {
        "data_files": files, "query_column": "question", "document_column": "answer", "tokenizer": str(encoder),
        "max_query_length": 6, "max_document_length": 12, "batch_size": 8,
    }  # fmt: skip
    kwargs.update(overrides)
    data = RetrievalDataModule(**kwargs)
    data.setup("fit")
    return data


# ---- recall@k ----------------------------------------------------------------------------------------
def brute_force_recall(queries, documents, query_ids, document_ids, k):
    """Per distinct query: rank every distinct document by score, count the relevant ones in the top k."""
    query_rows = {int(q): i for i, q in reversed(list(enumerate(query_ids)))}  # first occurrence
    document_rows = {int(d): i for i, d in reversed(list(enumerate(document_ids)))}
    relevant = {q: set() for q in query_rows}
    for q, d in zip(query_ids.tolist(), document_ids.tolist(), strict=True):
        relevant[q].add(d)
    total = 0.0
    for q, row in query_rows.items():
        scored = [(float(queries[row] @ documents[drow]), d) for d, drow in document_rows.items()]
        top = [d for _, d in sorted(scored, reverse=True)[:k]]
        total += len(relevant[q] & set(top)) / len(relevant[q])
    return total / len(query_rows)


def test_recall_at_k_matches_a_brute_force_ranking():
    torch.manual_seed(0)
    n, width = 40, 6
    query_ids = torch.tensor([i // 2 if i < 10 else i for i in range(n)])  # queries 0..4 have two documents each
    document_ids = torch.tensor([i % 25 for i in range(n)])  # documents 0..14 answer two queries each
    query_table, document_table = torch.randn(n, width), torch.randn(25, width)
    queries, documents = query_table[query_ids], document_table[document_ids]
    metric = RecallAtK(ks=(1, 3, 5, 100))
    for rows in torch.arange(n).split(15):  # several batches, as in a validation loop
        metric.update(queries[rows], documents[rows], query_ids[rows], document_ids[rows])
    values = metric.compute()
    assert set(values) == {"recall@1", "recall@3", "recall@5", "recall@100"}
    for k in (1, 3, 5, 100):
        expected = brute_force_recall(queries, documents, query_ids, document_ids, k)
        assert values[f"recall@{k}"].item() == pytest.approx(expected, abs=1e-6)
    assert values["recall@100"].item() == pytest.approx(1.0)  # k beyond the corpus: every relevant document
    assert 0.0 < values["recall@1"].item() < values["recall@5"].item() < 1.0


def test_recall_is_one_for_a_perfect_retriever_and_cutoffs_are_checked():
    embeddings = torch.eye(5)
    metric = RecallAtK(ks=(1,))
    metric.update(embeddings, embeddings, torch.arange(5), torch.arange(5))
    assert metric.compute()["recall@1"].item() == 1.0
    with pytest.raises(ValueError, match="positive integers"):
        RecallAtK(ks=(0, 5))
    with pytest.raises(ValueError, match="one shape"):
        metric.update(embeddings, embeddings[:3], torch.arange(5), torch.arange(5))


# ---- the losses --------------------------------------------------------------------------------------
def scores(student: torch.Tensor, teacher: torch.Tensor | None = None) -> tuple[ModelOutputs, ModelOutputs | None]:
    return ModelOutputs(logits=student), None if teacher is None else ModelOutputs(logits=teacher)


def test_score_distillation_matches_a_float64_hand_computation():
    torch.manual_seed(1)
    s, t = torch.randn(5, 5, dtype=torch.float64), torch.randn(5, 5, dtype=torch.float64)
    s.requires_grad_(True)
    loss = ScoreDistillation(temperature=0.5)
    value = loss(*scores(s, t), {})
    expected = 0.0
    for i in range(5):
        zs = [math.exp(s[i, j].item() / 0.5) for j in range(5)]
        zt = [math.exp(t[i, j].item() / 0.5) for j in range(5)]
        p_s = [z / sum(zs) for z in zs]
        p_t = [z / sum(zt) for z in zt]
        expected += sum(p_t[j] * (math.log(p_t[j]) - math.log(p_s[j])) for j in range(5)) / 5
    assert value.item() == pytest.approx(expected, rel=1e-10)
    value.backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    # softmax over each query's documents: a per-query shift of the scores changes nothing
    shifted = loss(*scores(s.detach() + torch.randn(5, 1, dtype=torch.float64), t), {})
    assert shifted.item() == pytest.approx(value.item(), rel=1e-9)
    assert loss(*scores(t, t), {}).item() == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        ScoreDistillation(temperature=0.0)
    with pytest.raises(ValueError, match="score matrices of one shape"):
        loss(*scores(s, t[:3]), {})


def test_in_batch_contrastive_leaves_copies_of_the_positive_out_of_the_negatives():
    torch.manual_seed(2)
    s = torch.randn(4, 4, dtype=torch.float64, requires_grad=True)
    document_ids = torch.tensor([7, 3, 7, 5])  # pairs 0 and 2 share their document
    loss = InBatchContrastive(temperature=0.1)
    value = loss(*scores(s), {"document_id": document_ids})
    expected = 0.0
    for i in range(4):
        kept = [j for j in range(4) if j == i or document_ids[j] != document_ids[i]]
        log_norm = math.log(sum(math.exp(s[i, j].item() / 0.1) for j in kept))
        expected += (log_norm - s[i, i].item() / 0.1) / 4
    assert value.item() == pytest.approx(expected, rel=1e-10)
    value.backward()
    assert torch.isfinite(s.grad).all()
    assert s.grad[0, 2] == 0 and s.grad[2, 0] == 0  # a copy of the positive gets no push
    plain = loss(*scores(s.detach()), {})  # without ids: every other column is a negative
    assert plain.item() == pytest.approx(torch.nn.functional.cross_entropy(s.detach() / 0.1, torch.arange(4)).item())
    assert not loss.needs_teacher


def test_embedding_matching_with_a_projection_matches_a_hand_computation():
    loss = EmbeddingMatching("document", projection=None)
    loss.build({"student_embedding": 3, "teacher_embedding": 5}, num_labels=5)
    assert loss.projection is not None and loss.name == "document_embedding_matching"
    torch.manual_seed(3)
    s, t = torch.randn(4, 3, requires_grad=True), torch.randn(4, 5)
    value = loss(ModelOutputs(logits=s, features={"document": s}), ModelOutputs(logits=t, features={"document": t}), {})
    w = loss.projection.weight.detach()
    expected = sum(float(((t[i] - w @ s[i].detach()) ** 2).sum()) for i in range(4)) / 4
    assert value.item() == pytest.approx(expected, rel=1e-5)
    value.backward()
    assert loss.projection.weight.grad is not None and torch.isfinite(s.grad).all()
    with pytest.raises(ValueError, match="allow a projection"):
        EmbeddingMatching(projection=False).build({"student_embedding": 3, "teacher_embedding": 5}, 5)
    with pytest.raises(ValueError, match="use it in kd_lightning.methods.EmbedDistillModule"):
        EmbeddingMatching().build({"s_last": 3}, 2)
    with pytest.raises(ValueError, match="'query' or 'document'"):
        EmbeddingMatching("passage")


def test_embedding_matching_is_zero_when_the_student_is_the_teacher(encoder, pair_files):
    losses = [EmbeddingMatching("query"), EmbeddingMatching("document"), ScoreDistillation()]
    module = EmbedDistillModule(TeacherSpec(str(encoder)), StudentSpec(from_teacher_layers=[0, 1]), losses=losses)
    module.eval()
    assert all(loss.projection is None for loss in losses[:2])  # equal widths: no projection
    batch = next(iter(pair_data(pair_files, encoder).val_dataloader()))
    student, teacher = module.student_outputs(batch), module.teacher_outputs(batch)
    for loss in losses:
        assert loss(student, teacher, batch).item() == pytest.approx(0.0, abs=1e-6)
    # the embeddings are mean-pooled, L2-normalised token states; scores are their inner products
    hidden = module.teacher(
        **{k[len("query_") :]: v for k, v in batch.items() if k.startswith("query_") and k != "query_id"}
    )
    mask = batch["query_attention_mask"].unsqueeze(-1).float()
    pooled = (hidden.last_hidden_state * mask).sum(1) / mask.sum(1)
    torch.testing.assert_close(teacher.features["query"], torch.nn.functional.normalize(pooled, dim=-1))
    torch.testing.assert_close(teacher.logits, teacher.features["query"] @ teacher.features["document"].T)
    # a one-layer student differs, and its gradient is finite
    smaller = EmbedDistillModule(TeacherSpec(str(encoder)), StudentSpec(from_teacher_layers=[0]))
    value = sum(loss(smaller.student_outputs(batch), smaller.teacher_outputs(batch), batch) for loss in smaller.losses)
    value.backward()
    assert value.item() > 1e-4
    assert all(torch.isfinite(p.grad).all() for p in smaller.student.parameters() if p.grad is not None)
    with pytest.raises(ValueError, match="remove num_labels"):
        EmbedDistillModule(TeacherSpec(str(encoder), num_labels=2), StudentSpec(from_teacher_layers=[0]))


# ---- the data ----------------------------------------------------------------------------------------
def test_retrieval_batches_tokenise_queries_and_documents_separately(encoder, pair_files):
    data = pair_data(pair_files, encoder, max_query_length=3)
    batch = next(iter(data.train_dataloader()))
    assert batch["query_input_ids"].shape[0] == batch["document_input_ids"].shape[0] == 8
    assert batch["query_input_ids"].shape[1] <= 3 < batch["document_input_ids"].shape[1] <= 12
    assert set(batch) >= {"query_attention_mask", "document_attention_mask", "query_id", "document_id", "index"}
    validation = data.datasets["validation"]
    rows = pd.read_csv(pair_files["validation"])
    # one id per distinct text: the FAQ answers shared by two questions share their document id
    for column, key in (("question", "query_id"), ("answer", "document_id")):
        ids = list(validation[key])
        first = {text: ids[i] for i, text in reversed(list(enumerate(rows[column])))}
        assert ids == [first[text] for text in rows[column]]
    assert len(set(list(validation["document_id"]))) < len(validation)
    assert data.monitor == "val/recall@1" and data.monitor_mode == "max"
    assert set(data.task_metrics().clone(prefix="val/").keys(keep_base=False)) == {"val/recall"}


def test_missing_columns_are_named_with_their_close_matches(encoder, pair_files, tmp_path):
    with pytest.raises(ValueError, match=r"no column\(s\) \['questoin'\] \(did you mean 'question'\?\)"):
        pair_data(pair_files, encoder, query_column="questoin")
    with pytest.raises(ValueError, match="document_column"):
        pair_data(pair_files, encoder, document_column="answers_text")
    broken = tmp_path / "empty_answer.csv"
    pd.DataFrame([{"question": "good film", "answer": "the plot"}, {"question": "bad", "answer": ""}] * 10).to_csv(
        broken, index=False
    )
    with pytest.raises(ValueError, match="empty or missing 'answer'"):
        pair_data({"train": str(broken), "validation": str(broken), "test": str(broken)}, encoder)
    with pytest.raises(ValueError, match="max_query_length must be a positive integer"):
        RetrievalDataModule(data_files=pair_files, max_query_length=0)
    with pytest.raises(ValueError, match="did you mean 'packaged/chatterbot_qa'"):
        RetrievalDataModule(dataset="packaged/chaterbot_qa")


def test_the_packaged_question_answer_pairs_keep_each_question_in_one_split():
    folder = materialize_packaged("packaged/chatterbot_qa", 0, 0.1, 0.1, PACKAGED_RETRIEVAL_SETS)
    frames = {split: pd.read_parquet(folder / f"{split}.parquet") for split in ("train", "validation", "test")}
    assert sum(len(f) for f in frames.values()) == 2393 - 32  # chatterbot's pairs without the 32 with an empty side
    questions = {split: set(f["query"].str.casefold()) for split, f in frames.items()}
    assert not questions["train"] & questions["validation"] and not questions["train"] & questions["test"]
    assert all(
        (f["query"].str.strip() != "").all() and (f["document"].str.strip() != "").all() for f in frames.values()
    )
    assert 0.08 < len(frames["validation"]) / 2361 < 0.12


# ---- the config ----------------------------------------------------------------------------------------
def test_the_config_parses(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["kd_lightning"])  # the CLI warns when pytest's own arguments are there too
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIG), "--print_config"])
    assert exit_info.value.code in (None, 0)
    config = yaml.safe_load(capsys.readouterr().out)
    model = config["model"]["init_args"]
    assert config["model"]["class_path"] == "kd_lightning.methods.EmbedDistillModule"
    assert model["teacher"]["name_or_path"] == "all-MiniLM-L6-v2" and model["student"]["from_teacher_layers"] == [0, 1]
    names = [loss["class_path"].rpartition(".")[2] for loss in model["losses"]]
    assert names == ["InBatchContrastive", "ScoreDistillation", "EmbeddingMatching", "EmbeddingMatching"]
    assert config["data"]["init_args"]["dataset"] == "packaged/chatterbot_qa"


def test_the_config_fits_through_the_cli(encoder, pair_files, tmp_path, monkeypatch):
    from transformers import AutoModel

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["kd_lightning"])
    fit_config(
        CONFIG, encoder,
        "--data.init_args.query_column=question",
        "--data.init_args.document_column=answer",
        "--data.init_args.max_query_length=6",
        "--data.init_args.max_document_length=12",
        "--data.init_args.batch_size=8",
        "--data.init_args.validation_fraction=0.25",
        "--trainer.max_epochs=1",
        "--trainer.log_every_n_steps=1",
        data_files=pair_files["train"], limit_val_batches=None,
    )  # fmt: skip
    logged = scalars("runs/retrieval/embed_distill/version_0")
    for tag in ("train/loss/in_batch_contrastive", "train/loss/score_distillation", "train/loss/query_embedding_matching",
                "train/loss/document_embedding_matching", "val/recall@1", "val/recall@10", "val/teacher/recall@1"):  # fmt: skip
        assert tag in logged, f"{tag} not logged; logged: {sorted(logged)}"
    assert all(0.0 <= v <= 1.0 for v in logged["val/recall@10"])
    assert list(Path("runs/retrieval/embed_distill/version_0").glob("checkpoints/best-*.ckpt")), (
        "the checkpoint follows val/recall@1"
    )
    student = AutoModel.from_pretrained("runs/retrieval/embed_distill/student")
    assert student.config.num_hidden_layers == 1

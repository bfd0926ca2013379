"""The generalisation diagnostic: 1-D Wasserstein against scipy and a quantile loop, the sliced
distance's properties, the callback's logged values on a tiny fit, and its config through the CLI."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import TINY_TEXT_DATA, csv_datamodule, distill_module, fit_config, quiet_trainer
from loss_testing import one_thread  # noqa: F401
from scipy import stats

from kd_lightning.callbacks import GeneralisationDiagnostic
from kd_lightning.callbacks import generalisation as gen

REPO = Path(__file__).resolve().parents[1]


def samples(n: int, d: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n, d, generator=g, dtype=torch.float64) * torch.linspace(0.5, 2.0, d, dtype=torch.float64) + shift
    )


def wasserstein_by_quantiles(x: list[float], y: list[float], p: float) -> float:
    """``int_0^1 |F^-1(u) - G^-1(u)|^p du`` with the empirical quantile functions, integrated
    exactly over the pieces between the breakpoints ``i/n`` and ``j/m`` (in exact fractions)."""
    from fractions import Fraction

    xs, ys = sorted(x), sorted(y)
    n, m = len(xs), len(ys)
    grid = sorted({Fraction(i, n) for i in range(n + 1)} | {Fraction(j, m) for j in range(m + 1)})
    total = 0.0
    for a, b in zip(grid[:-1], grid[1:], strict=True):
        u = (a + b) / 2  # F^-1(u) = xs[ceil(u n) - 1]
        qx, qy = xs[math.ceil(u * n) - 1], ys[math.ceil(u * m) - 1]
        total += float(b - a) * abs(qx - qy) ** p
    return total


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("n, m", [(40, 40), (40, 17), (5, 33), (1, 9)])
def test_one_dimensional_wasserstein_matches_scipy_and_the_quantile_integral(n, m):
    x, y = samples(n, 3, 1)[:, 0], samples(m, 3, 2, shift=0.7)[:, 0]
    w1 = gen.wasserstein_1d(x, y, p=1)
    assert float(w1) == pytest.approx(stats.wasserstein_distance(x.numpy(), y.numpy()), rel=1e-12, abs=1e-12)
    for p in (1.0, 2.0, 3.0):
        expected = wasserstein_by_quantiles(x.tolist(), y.tolist(), p)
        assert float(gen.wasserstein_1d(x, y, p)) == pytest.approx(expected, rel=1e-10, abs=1e-12)
    # one call measures every column
    both = gen.wasserstein_1d(samples(n, 4, 3), samples(m, 4, 4), p=2)
    for column in range(4):
        single = gen.wasserstein_1d(samples(n, 4, 3)[:, column], samples(m, 4, 4)[:, column], p=2)
        assert float(both[column]) == pytest.approx(float(single), rel=1e-12)
    with pytest.raises(ValueError, match="samples on both sides"):
        gen.wasserstein_1d(x[:0], y)


def test_equal_sample_counts_reduce_to_sorted_differences():
    x, y = samples(30, 1, 5)[:, 0], samples(30, 1, 6)[:, 0]
    expected = (x.sort().values - y.sort().values).square().mean()
    torch.testing.assert_close(gen.wasserstein_1d(x, y, 2), expected)


def test_directions_are_seeded_unit_vectors():
    directions = gen.random_directions(7, 50, seed=3)
    assert directions.shape == (7, 50)
    torch.testing.assert_close(directions.norm(dim=0), torch.ones(50))
    assert torch.equal(directions, gen.random_directions(7, 50, seed=3))
    assert not torch.equal(directions, gen.random_directions(7, 50, seed=4))


@pytest.mark.usefixtures("one_thread")
def test_sliced_wasserstein_matches_a_loop_and_its_properties():
    x, y = samples(25, 5, 7), samples(18, 5, 8, shift=0.4)
    directions = gen.random_directions(5, 12, seed=0, dtype=torch.float64)
    value = gen.sliced_wasserstein(x, y, directions, p=2)
    by_hand = 0.0
    for direction in range(12):
        theta = directions[:, direction]
        px = [float(sum(row[k] * theta[k] for k in range(5))) for row in x]
        py = [float(sum(row[k] * theta[k] for k in range(5))) for row in y]
        by_hand += wasserstein_by_quantiles(px, py, 2.0) / 12
    assert float(value) == pytest.approx(math.sqrt(by_hand), rel=1e-10)

    assert float(gen.sliced_wasserstein(x, x.clone(), directions)) == 0.0, "identical sets"
    assert float(gen.sliced_wasserstein(x, x[torch.randperm(25)], directions)) == pytest.approx(0.0, abs=1e-12)
    shift = torch.tensor([3.0, -1.0, 0.5, 2.0, -4.0], dtype=torch.float64)
    torch.testing.assert_close(gen.sliced_wasserstein(x + shift, y + shift, directions), value)  # common translation
    assert float(gen.sliced_wasserstein(x, y + 5.0, directions)) > float(value)
    # a common rotation with the directions rotated alike leaves it unchanged too
    rotation, _ = torch.linalg.qr(torch.randn(5, 5, generator=torch.Generator().manual_seed(9), dtype=torch.float64))
    torch.testing.assert_close(gen.sliced_wasserstein(x @ rotation, y @ rotation, rotation.T @ directions), value)
    with pytest.raises(ValueError, match="widths differ"):
        gen.sliced_wasserstein(x, y[:, :4], directions)


def test_bad_settings_fail_with_the_fix(tiny_bert, tiny_csv, tmp_path):
    with pytest.raises(ValueError, match="reduce must be 'mean' or 'cls'"):
        GeneralisationDiagnostic(reduce="tokens")
    with pytest.raises(ValueError, match="p must be >= 1"):
        GeneralisationDiagnostic(p=0.5)
    module = distill_module(tiny_bert)
    callback = GeneralisationDiagnostic(taps=["s_last", "bert.encoder.layr.0"])
    with pytest.raises(ValueError, match="neither a student tap.*declared: s_last.*bert.encoder.layer.0"):
        callback.setup(None, module, "fit")
    with pytest.raises(ValueError, match="pass `datamodule=` to the trainer"):
        GeneralisationDiagnostic().setup(SimpleNamespace(datamodule=None), module, "fit")


@pytest.mark.usefixtures("one_thread")
def test_the_callback_logs_a_finite_distance_per_tap_at_each_validation(tiny_bert, tiny_csv, tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    module = distill_module(tiny_bert)  # declares the student tap s_last (bert.encoder.layer.0, mean)
    callback = GeneralisationDiagnostic(
        taps=["s_last", "bert.embeddings"], directions=16, train_samples=40, batch_size=16
    )
    logger = CSVLogger(tmp_path, name="logs")
    trainer = quiet_trainer(tmp_path, max_steps=4, val_check_interval=2, logger=logger, callbacks=[callback])
    data = csv_datamodule(tiny_csv)
    trainer.fit(module, datamodule=data)
    assert callback.paths == {"s_last": "bert.encoder.layer.0", "bert.embeddings": "bert.embeddings"}
    assert len(callback.train_indices) == 40 and callback.train_indices == sorted(set(callback.train_indices))
    for name in ("s_last", "bert.embeddings"):
        value = trainer.callback_metrics[f"val/generalisation/sw/{name}"]
        assert torch.isfinite(value) and float(value) > 0 and float(value) == pytest.approx(callback.values[name])
    logger.save()
    import pandas as pd

    logged = pd.read_csv(Path(logger.log_dir) / "metrics.csv")
    column = logged["val/generalisation/sw/s_last"].dropna()
    assert len(column) == 2, "one value per validation (none at the sanity check)"
    assert all(math.isfinite(v) for v in column)
    assert not any(p.stat().st_size > 100_000 for p in tmp_path.rglob("*") if p.is_file()), "nothing large written"
    assert callback.state_dict() == {"train_indices": callback.train_indices}
    assert not module.student_taps._captured, "the training-subset pass leaves nothing captured"

    # the last value by hand: the final student (eval mode), one example at a time, on the training
    # subset and on the two validation batches the trainer used
    student = module.student.eval()
    layer = student.bert.encoder.layer[0]

    def pooled(example: dict) -> torch.Tensor:
        captured = []
        handle = layer.register_forward_hook(
            lambda m, a, out: captured.append(out[0] if isinstance(out, tuple) else out)
        )
        inputs = {k: torch.tensor([example[k]]) for k in ("input_ids", "attention_mask", "token_type_ids")}
        with torch.no_grad():
            student(**inputs)
        handle.remove()
        return captured[0][0].mean(0)

    train = data.datasets["train"]
    x = torch.stack([pooled(train[i]) for i in callback.train_indices])
    validation = data.datasets["validation"]
    seen = min(len(validation), 2 * data.eval_batch_size)  # limit_val_batches=2, in order
    y = torch.stack([pooled(validation[i]) for i in range(seen)])
    expected = gen.sliced_wasserstein(x, y, gen.random_directions(x.shape[-1], 16, seed=0), p=2)
    assert float(expected) == pytest.approx(callback.values["s_last"], rel=1e-4)


def test_default_taps_are_the_module_student_taps_or_every_layer(tiny_bert):
    module = distill_module(tiny_bert)
    callback = GeneralisationDiagnostic()
    callback.setup(None, module, "fit")
    assert callback.paths == {"s_last": "bert.encoder.layer.0"}
    bare = distill_module(tiny_bert, taps={}, losses=distill_module(tiny_bert).losses[:2])
    callback.setup(None, bare, "fit")
    assert callback.paths == {"bert.encoder.layer.0": "bert.encoder.layer.0"}  # the 1-layer student's stack


def test_the_config_parses_and_trains_two_steps(tiny_bert, tiny_csv, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["kd_lightning"])
    cli = fit_config(
        REPO / "configs/methods/generalisation_diagnostic.yaml", tiny_bert, *TINY_TEXT_DATA,
        layers="[0, 1]", data_files=tiny_csv,
    )  # fmt: skip
    callbacks = [c for c in cli.trainer.callbacks if isinstance(c, GeneralisationDiagnostic)]
    assert len(callbacks) == 1 and callbacks[0].num_directions == 128 and callbacks[0].p == 2.0
    metrics = cli.trainer.callback_metrics
    for layer in ("bert.encoder.layer.0", "bert.encoder.layer.1"):
        assert torch.isfinite(metrics[f"val/generalisation/sw/{layer}"])

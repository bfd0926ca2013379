"""Taps: each reduction against a manual computation, masks respected, unknown paths explained."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kd_lightning.taps import FeatureTaps, TapSpec, hidden_states_of, reduce_hidden


class TupleLayer(nn.Module):
    """Returns (hidden, attention) like HF layers; hidden = linear(x)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.linear(x), torch.zeros(1)


class Toy(nn.Module):
    def __init__(self, width: int = 6) -> None:
        super().__init__()
        self.layers = nn.ModuleList([TupleLayer(width), TupleLayer(width)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)[0]
        return x


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    hidden = torch.randn(3, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    return hidden, mask


def test_cls_takes_first_position(batch):
    hidden, mask = batch
    torch.testing.assert_close(reduce_hidden(hidden, "cls", mask), hidden[:, 0])


def test_mean_ignores_padding(batch):
    hidden, mask = batch
    expected = torch.stack([hidden[i, : int(mask[i].sum())].mean(0) for i in range(3)])
    torch.testing.assert_close(reduce_hidden(hidden, "mean", mask), expected)
    # changing padded positions must not change the result
    noisy = hidden.clone()
    noisy[mask == 0] = 1e4
    torch.testing.assert_close(reduce_hidden(noisy, "mean", mask), expected)


def test_tokens_keeps_real_positions_in_order(batch):
    hidden, mask = batch
    expected = torch.cat([hidden[i, : int(mask[i].sum())] for i in range(3)])
    rows = reduce_hidden(hidden, "tokens", mask)
    assert rows.shape == (int(mask.sum()), 4)
    torch.testing.assert_close(rows, expected)


def test_none_returns_output_unchanged(batch):
    hidden, mask = batch
    assert reduce_hidden(hidden, "none", mask) is hidden


def test_mean_without_mask_is_plain_mean(batch):
    hidden, _ = batch
    torch.testing.assert_close(reduce_hidden(hidden, "mean", None), hidden.mean(1))


def test_hooks_capture_named_submodule_and_clear_each_step():
    torch.manual_seed(0)
    model = Toy()
    taps = FeatureTaps(model, {"first": TapSpec("student", "layers.0", "none"), "t": TapSpec("teacher", "layers.1")}, "student")
    assert list(taps) == ["first"]
    x = torch.randn(2, 3, 6)
    expected = model.layers[0](x)[0].detach()
    taps.clear()
    model(x)
    features = taps.collect(None)
    torch.testing.assert_close(features["first"], expected)
    # nothing is kept after collect: a step whose forward did not run the module fails loudly
    with pytest.raises(RuntimeError, match="captured nothing"):
        taps.collect(None)
    taps.remove()
    model(x)
    assert taps._captured == {}


def test_unknown_path_lists_close_matches():
    with pytest.raises(ValueError) as err:
        FeatureTaps(Toy(), {"x": TapSpec("student", "layer.1")}, "student")
    message = str(err.value)
    assert "'layer.1' does not exist" in message
    assert "layers.1" in message
    assert "python -m kd_lightning modules" in message


def test_unknown_reduction_is_rejected():
    with pytest.raises(ValueError, match="unknown reduction 'max'"):
        FeatureTaps(Toy(), {"x": TapSpec("student", "layers.0", "max")}, "student")


def test_hidden_states_of_model_outputs():
    from transformers.modeling_outputs import BaseModelOutput

    h = torch.randn(2, 3, 4)
    assert hidden_states_of(BaseModelOutput(last_hidden_state=h)) is h
    assert hidden_states_of((h, None)) is h
    with pytest.raises(TypeError):
        hidden_states_of(None)

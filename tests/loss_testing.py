"""Inputs shared by the loss and alignment-metric tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def one_thread():
    """Small tensors: one thread avoids OpenMP spin-waits on the shared 2-core machines."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def logits_pair(
    shape: tuple[int, ...], seed: int = 0, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Student and teacher logits with a spread of a few nats."""
    g = torch.Generator().manual_seed(seed)
    return 3 * torch.randn(shape, generator=g, dtype=dtype), 3 * torch.randn(shape, generator=g, dtype=dtype)


def features(n: int, d: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``(n, d)`` rows with column means that differ (centring matters)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g, dtype=torch.float64) + torch.linspace(-2, 2, d, dtype=torch.float64)).to(
        dtype
    )

"""A frozen model's forward pass captured as CUDA graphs and replayed, one graph per input shape.

On a GPU a small teacher's forward pass is bound by the host: every layer is a few dozen kernel
launches, each costing Python and dispatcher time, while the kernels themselves are short. A CUDA
graph records the launches of one forward pass once and replays them with a single call
(``torch.cuda.CUDAGraph``), so the teacher's per-step host time becomes a copy of the inputs, one
replay and a copy of the outputs. The arithmetic is the same kernels on the same data: outputs
agree with the eager forward pass to floating-point rounding (tested).

A graph has fixed shapes and addresses, so there is one per distinct input signature (names,
shapes and dtypes of the inputs, and the autocast state): with dynamic padding, one per padded
length seen. Capturing a new signature costs two eager passes (``warmup_steps + 1`` for the
first); after ``max_graphs`` signatures, new ones run eagerly (with one warning). All graphs
share one memory pool for their intermediates; each keeps its static inputs and outputs.
Replayed outputs are copied out of the graph's static buffers before they are returned, so a
later replay never changes what a caller holds.

What may be captured: a function of the inputs with no host synchronisation (no ``.item()``,
no data-dependent shapes such as boolean indexing), no randomness, and parameters that stay where
they are (moving the model invalidates the graphs: :meth:`GraphedForward.reset`). A frozen
teacher in eval mode under ``no_grad`` is such a function; its taps' raw captures are returned
and reduced outside the graph (the ``tokens`` reduction has a data-dependent shape).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch
from torch import Tensor
from torch.utils._pytree import tree_map

Outputs = TypeVar("Outputs")


@dataclass
class CudaGraphConfig:
    """Replay the frozen teacher's forward pass as CUDA graphs (GPU runs only).

    Args:
        max_graphs: the most input signatures (padded lengths, batch sizes) captured; later
            ones run eagerly. Each graph keeps its static inputs and outputs (logits and the
            raw tap captures) on the GPU; intermediates share one pool. With dynamic padding
            to ``max_length`` tokens there are at most ``max_length`` signatures per batch size.
        warmup_steps: eager passes on the capture stream before the first capture (lazy
            initialisation of libraries such as cuBLAS must happen outside a capture); one
            pass before each later capture.
    """

    max_graphs: int = 64
    warmup_steps: int = 2

    def __post_init__(self) -> None:
        if not isinstance(self.max_graphs, int) or self.max_graphs < 1:
            raise ValueError(f"teacher_cuda_graphs.max_graphs must be a positive number of graphs, got {self.max_graphs!r}")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 1:
            raise ValueError(
                f"teacher_cuda_graphs.warmup_steps must be at least 1 eager pass before a capture, got {self.warmup_steps!r}"
            )


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: dict[str, Tensor]
    outputs: Any


def _autocast_state() -> tuple[bool, torch.dtype]:
    return torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")


class GraphedForward(Generic[Outputs]):
    """``forward(inputs)`` replayed from CUDA graphs, one per input signature (module docstring).

    ``captures``, ``replays`` and ``eager_calls`` count the graphs recorded (over resets: Lightning
    moves the module to the CPU when a fit ends), the calls served by a replay, and the calls run
    eagerly because ``max_graphs`` were held.

    Args:
        forward: a capturable function of a dict of CUDA tensors (see the module docstring),
            returning a pytree of tensors (e.g. ``(logits, {tap: capture})``).
        config: how many graphs and how many warm-up passes.
        name: what the warning about eager fallback calls the function.
    """

    def __init__(self, forward: Callable[[dict[str, Tensor]], Outputs], config: CudaGraphConfig | None = None, name: str = "forward") -> None:
        self.forward = forward
        self.config = config or CudaGraphConfig()
        self.name = name
        self.graphs: dict[tuple, _Graph] = {}
        self.captures = 0
        self.replays = 0
        self.eager_calls = 0
        self._pool: Any = None
        self._stream: torch.cuda.Stream | None = None
        self._warned_full = False

    @staticmethod
    def signature(inputs: Mapping[str, Tensor]) -> tuple:
        """What identifies a graph: each input's name, shape, dtype and device, and the autocast state."""
        return (*((k, tuple(v.shape), v.dtype, v.device) for k, v in sorted(inputs.items())), _autocast_state())

    def reset(self) -> None:
        """Forget every graph (after the model's parameters moved, e.g. ``.to(device)``)."""
        self.graphs.clear()
        self._pool = None
        self._stream = None

    def __call__(self, inputs: Mapping[str, Tensor]) -> Outputs:
        inputs = dict(inputs)
        not_cuda = [k for k, v in inputs.items() if not (isinstance(v, Tensor) and v.is_cuda)]
        if not_cuda:
            raise ValueError(f"CUDA graphs replay CUDA tensors only; inputs {not_cuda} are not: move the batch to the GPU")
        key = self.signature(inputs)
        entry = self.graphs.get(key)
        if entry is None:
            if len(self.graphs) >= self.config.max_graphs:
                self._warn_full()
                self.eager_calls += 1
                return self.forward(inputs)
            entry = self._capture(inputs)
            self.graphs[key] = entry
            self.captures += 1
        for name, value in inputs.items():
            entry.inputs[name].copy_(value)
        entry.graph.replay()
        self.replays += 1
        return tree_map(lambda t: t.clone() if isinstance(t, Tensor) else t, entry.outputs)

    def _capture(self, inputs: dict[str, Tensor]) -> _Graph:
        """Warm up on the capture stream and record one graph. Unlike ``torch.cuda.graph``, the
        allocator's cached blocks are kept (``empty_cache`` there would make the next training
        step allocate its whole working set again, for every new shape)."""
        static_inputs = {k: v.clone() for k, v in inputs.items()}
        enabled, dtype = _autocast_state()
        # The autocast weight cache would hand the capture casts made outside its memory pool.
        autocast = torch.autocast("cuda", dtype=dtype, enabled=enabled, cache_enabled=False)
        if self._stream is None:
            self._stream = torch.cuda.Stream()
        stream = self._stream
        stream.wait_stream(torch.cuda.current_stream())
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(stream), autocast:
            for _ in range(self.config.warmup_steps if self.captures == 0 else 1):
                self.forward(static_inputs)
            torch.cuda.synchronize()
            graph.capture_begin(*(() if self._pool is None else (self._pool,)), capture_error_mode="thread_local")
            try:
                static_outputs = self.forward(static_inputs)
            except Exception as error:
                with contextlib.suppress(RuntimeError):
                    graph.capture_end()
                raise RuntimeError(
                    f"the {self.name} cannot be captured as a CUDA graph ({error}). Graphs need a forward pass "
                    "without host synchronisation (.item(), data-dependent shapes) or randomness: "
                    "remove teacher_cuda_graphs to run it eagerly."
                ) from error
            graph.capture_end()
        torch.cuda.current_stream().wait_stream(stream)
        if self._pool is None:
            self._pool = graph.pool()
        return _Graph(graph, static_inputs, static_outputs)

    def _warn_full(self) -> None:
        if not self._warned_full:
            self._warned_full = True
            warnings.warn(
                f"{self.name}: {len(self.graphs)} CUDA graphs captured (max_graphs); new input shapes run eagerly. "
                "Raise teacher_cuda_graphs.max_graphs, or give batches fewer distinct shapes "
                "(a constant batch size with drop_last, fewer padded lengths).",
                stacklevel=3,
            )

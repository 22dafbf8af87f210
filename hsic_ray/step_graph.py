"""A stage's training step captured once as a CUDA graph and replayed for every full batch.

A stage step is a few hundred small kernels (per layer: forward, kernel, centring, Cholesky, triangular
solves, backward, update); launched one by one from Python they cost more than the arithmetic on a GPU.
Replaying one graph launches them all at once. The step must not read anything back to the host, which
the batched step guarantees (see `StageStep._step`).

Capturing needs warm-up steps (they allocate the gradients' and momentum buffers' memory), which would
train the layers on the capture batch: `rolled_back` puts every parameter, buffer and momentum buffer
back afterwards, in place, so the graph's pointers stay valid and training continues from where it was.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from itertools import chain

import torch
from torch import Tensor, nn

from hsic_ray.objective import KernelFactors
from hsic_ray.sgd import SGD

StepFn = Callable[[Tensor, KernelFactors], tuple[Tensor, Tensor]]
WARMUP_STEPS = 3


@contextlib.contextmanager
def rolled_back(modules: Sequence[nn.Module], optimizer: SGD, extra: Sequence[Tensor] = ()) -> Iterator[None]:
    """Run the body, then restore in place every parameter and buffer of `modules`, the `extra` tensors and
    the optimizer's momentum buffers. A momentum buffer the body created is zeroed, which for SGD without
    dampening makes the next step the same as a first step."""
    tensors = list(chain(*(chain(m.parameters(), m.buffers()) for m in modules), extra))
    saved = [t.detach().clone() for t in tensors]
    momenta = {
        p: s["momentum_buffer"].clone() for p, s in optimizer.state.items() if s.get("momentum_buffer") is not None
    }
    try:
        yield
    finally:
        _restore(tensors, saved, optimizer, momenta)


def _restore(tensors: list[Tensor], saved: list[Tensor], optimizer: SGD, momenta: dict) -> None:
    with torch.no_grad():
        for tensor, value in zip(tensors, saved):
            tensor.copy_(value)
        for param, state in optimizer.state.items():
            buffer = state.get("momentum_buffer")
            if buffer is None:
                continue
            if param in momenta:
                buffer.copy_(momenta[param])
            else:
                buffer.zero_()


def _clone_factors(factors: KernelFactors) -> KernelFactors:
    return KernelFactors(None if factors.x_factor is None else factors.x_factor.clone(), factors.y_factor.clone())


def _copy_factors(into: KernelFactors, factors: KernelFactors) -> None:
    if into.x_factor is not None:
        into.x_factor.copy_(factors.x_factor, non_blocking=True)
    into.y_factor.copy_(factors.y_factor, non_blocking=True)


class CapturedStep:
    """`step(x, factors)` as one CUDA graph, captured on the first call, for batches of that call's shape.

    `fits(x)` says whether a batch can replay the graph (a partial last batch cannot: run it eagerly).
    `reset()` drops the graph; the next call captures again (after the optimizer's state was replaced by a
    checkpoint load, or the step's precision changed).
    """

    def __init__(self, step: StepFn, modules: Sequence[nn.Module], optimizer: SGD, extra: Sequence[Tensor] = ()):
        self._step = step
        self._modules = modules
        self._optimizer = optimizer
        self._extra = extra
        self._graph: torch.cuda.CUDAGraph | None = None

    def fits(self, x: Tensor) -> bool:
        return self._graph is None or x.shape == self._x.shape

    def reset(self) -> None:
        self._graph = None

    def __call__(self, x: Tensor, factors: KernelFactors) -> tuple[Tensor, Tensor]:
        if self._graph is None:
            self._capture(x, factors)
        self._x.copy_(x, non_blocking=True)
        _copy_factors(self._factors, factors)
        self._graph.replay()
        # The graph writes its outputs into the same memory every replay: hand out copies.
        return self._out.clone(), self._stats.clone()

    def _capture(self, x: Tensor, factors: KernelFactors) -> None:
        self._x, self._factors = x.clone(), _clone_factors(factors)
        side = torch.cuda.Stream(device=x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with rolled_back(self._modules, self._optimizer, self._extra):
            with torch.cuda.stream(side):
                for _ in range(WARMUP_STEPS):
                    self._step(self._x, self._factors)
            torch.cuda.current_stream(x.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._out, self._stats = self._step(self._x, self._factors)
        self._graph = graph

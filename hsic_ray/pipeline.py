"""Where the HSIC layers live and train, as the training loop sees them: the `Pipeline` protocol.

Two pipelines implement it: `hsic_ray.local_pipeline.LocalPipeline` (every layer in this process) and
`hsic_ray.distributed.ray_pipeline.RayPipeline` (stage actors on a Ray cluster).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from hsic_ray.data import Batch
from hsic_ray.objective import KernelFactors
from hsic_ray.run.directory import RunDirectory


@dataclass
class StepResult:
    """What one training step of the whole pipeline gives back to the loop."""

    layer_stats: Tensor  # [layers, 3]: (loss, nhsic_zx, nhsic_zy)
    output: Tensor | None = None  # the last layer's output (CPU), when asked for
    stage_seconds: list[tuple[float, float]] | None = None  # per stage (busy, idle) for this step
    stage_transfer_seconds: list[float] | None = None  # per stage, the part of busy spent moving arrays
    # per stage, the part of busy spent computing kernel factors (the first stage's, with ray.factors_on=first_stage)
    stage_factor_seconds: list[float] | None = None


class Pipeline(Protocol):
    """Where the HSIC layers live and train."""

    max_in_flight: int
    num_stages: int
    # Where the loop computes each batch's factors and hands the batch over; None: the pipeline computes them
    # itself from the batch (the loop hands over the batch on the CPU, and no factors).
    factors_device: torch.device | None
    prefetch_factors: bool  # compute the next batches' factors in a thread while the pipeline works
    # Threads the loop's own math (factors) may use while the pipeline trains; None: as many as torch has. The
    # loop has every core between epochs, when it evaluates and probes and the stages wait for it.
    coordinator_threads: int | None
    placements: list[dict[str, Any]]  # per stage: layers, node, device (rewritten after recoveries)

    def submit(self, batch: Batch, factors: KernelFactors | None) -> Any:
        """Start one training step of every layer on this batch (batch and factors on `factors_device`);
        returns a handle for `result`."""

    def result(self, handle: Any, want_output: bool, read_back: bool = True) -> StepResult:
        """Wait for a submitted step. With read_back False the loop will not read `layer_stats`, so a
        pipeline may leave the step running on its device (no host sync); True at log steps, where the
        pipeline also checks its stages' health."""

    def forward(self, x: Tensor) -> Tensor:
        """Eval-mode output of the whole network (CPU)."""

    def forward_chunks(self, chunks: Iterable[Tensor]) -> Iterator[Tensor]:
        """`forward` of each chunk, in order; stages may work on several chunks at once."""

    def calibrate_batchnorm(self, batches: list[Tensor]) -> None:
        """Recompute every layer's BatchNorm running statistics from `batches`, through the whole network."""

    def layer_outputs(self, chunks: Iterable[Tensor], max_features: int) -> Iterator[list[Tensor]]:
        """For each chunk of images, in order: every layer's eval-mode output as its linear probe reads it
        (`hsic_ray.probes.probe_view`, at most `max_features` wide), CPU; stages may work on several chunks at
        once."""

    def measure(self, x: Tensor, factors: KernelFactors) -> Tensor:
        """Eval-mode per-layer [layers, 2] (nhsic_zx, nhsic_zy) on one batch."""

    def save(self, run: RunDirectory, step: int) -> None:
        """Write every stage's state into step's checkpoint (see hsic_ray.run.checkpoint)."""

    def load(self, run: RunDirectory, step: int) -> None:
        """Restore every stage from step's checkpoint."""

    def events(self) -> list[dict[str, Any]]:
        """Records of what happened since the last call (recoveries), for metrics.jsonl."""

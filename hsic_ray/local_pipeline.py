"""The in-process pipeline: every layer in one stage, stepped synchronously. No Ray."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from hsic_ray.config import OptimConfig
from hsic_ray.data import Batch
from hsic_ray.models import LayerwiseNet
from hsic_ray.objective import HSICObjective, KernelFactors
from hsic_ray.pipeline import StepResult
from hsic_ray.run import checkpoint
from hsic_ray.run.directory import RunDirectory
from hsic_ray.schedule import LRSchedule
from hsic_ray.stage_step import StageStep


class LocalPipeline:
    """Trains every layer in this process; a step is done by the time `submit` returns."""

    max_in_flight = 1
    num_stages = 1

    def __init__(
        self,
        net: LayerwiseNet,
        objective: HSICObjective,
        optim: OptimConfig,
        device: torch.device | str,
        cuda_graphs: str = "auto",
        lr_scales: Sequence[float] | None = None,
        schedule: LRSchedule | None = None,
    ):
        self.stage = StageStep(list(net.layers), objective, optim, device, cuda_graphs, lr_scales, schedule)
        # Factors are computed where the step runs: on a GPU a few small kernels, where on the host they cost
        # more than a graph-captured step (docs/results.md, "On a GPU"). No second thread: on the CPU it would
        # compete with the step for the same cores, and on a GPU it could launch work while the step is being
        # captured.
        self.factors_device = self.stage.device
        self.prefetch_factors = False
        self.coordinator_threads = None
        self.placements = [{"layers": [0, len(net)], "node_ip": "local", "device": str(self.stage.device)}]

    def submit(self, batch: Batch, factors: KernelFactors) -> tuple[Tensor, Tensor]:
        return self.stage.train_step(batch.x, factors)

    def result(self, handle: tuple[Tensor, Tensor], want_output: bool, read_back: bool = True) -> StepResult:
        out, stats = handle
        if read_back:  # otherwise the step is left running on the device: no host sync
            self.stage.check_solves()
            stats = stats.cpu()
        return StepResult(stats, out.cpu() if want_output else None)

    def forward(self, x: Tensor) -> Tensor:
        return self.stage.forward(x).cpu()

    def calibrate_batchnorm(self, batches: list[Tensor]) -> None:
        self.stage.calibrate_batchnorm(batches)

    def forward_chunks(self, chunks: Iterable[Tensor]) -> Iterator[Tensor]:
        return map(self.forward, chunks)

    def layer_outputs(self, chunks: Iterable[Tensor], max_features: int) -> Iterator[list[Tensor]]:
        for x in chunks:
            yield [view.cpu() for view in self.stage.layer_outputs(x, max_features)[1]]

    def measure(self, x: Tensor, factors: KernelFactors) -> Tensor:
        return self.stage.measure(x, factors)[1]

    def save(self, run: RunDirectory, step: int) -> None:
        checkpoint.save_state(run, checkpoint.stage_file(step, 0), self.stage.state_dict())

    def load(self, run: RunDirectory, step: int) -> None:
        self.stage.load_state_dict(checkpoint.load_state(run, checkpoint.stage_file(step, 0)))

    def events(self) -> list[dict[str, Any]]:
        return []

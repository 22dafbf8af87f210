"""The in-process pipeline: every layer in one stage, stepped synchronously. No Ray."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from hsic_ray.config import OptimConfig
from hsic_ray.models import LayerwiseNet
from hsic_ray.objective import BatchTargets, HSICObjective
from hsic_ray.stage import StageTrainer


class LocalPipeline:
    """Trains every layer in this process; a step is done by the time `submit` returns."""

    max_in_flight = 1

    def __init__(self, net: LayerwiseNet, objective: HSICObjective, optim: OptimConfig, device: torch.device | str):
        self.stage = StageTrainer(list(net.layers), objective, optim, device)

    def submit(self, x: Tensor, targets: BatchTargets) -> tuple[Tensor, Tensor]:
        return self.stage.train_step(x, targets)

    def result(self, handle: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        out, stats = handle
        return out.cpu(), stats

    def forward(self, x: Tensor) -> Tensor:
        return self.stage.forward(x).cpu()

    def measure(self, x: Tensor, targets: BatchTargets) -> Tensor:
        return self.stage.measure(x, targets)[1]

    def state_dict(self) -> dict[str, Any]:
        return self.stage.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stage.load_state_dict(state)

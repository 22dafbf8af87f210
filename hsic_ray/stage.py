"""The training step of a stage: a contiguous run of layers, each with its own persistent optimizer.

For each batch, every layer takes the previous layer's detached output, computes its own HSIC loss and
steps its own optimizer: one forward per layer, no gradient ever crossing a layer boundary. The same
class serves the in-process trainer (one stage holding every layer) and each Ray stage actor.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

from hsic_ray.config import OptimConfig
from hsic_ray.objective import BatchTargets, HSICObjective

# Columns of the per-layer statistics a step returns.
STAT_NAMES = ("loss", "nhsic_zx", "nhsic_zy")


def make_sgd(params, cfg: OptimConfig) -> torch.optim.SGD:
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


class StageTrainer:
    def __init__(
        self,
        layers: Sequence[nn.Module],
        objective: HSICObjective,
        optim_cfg: OptimConfig,
        device: torch.device | str = "cpu",
    ):
        self.device = torch.device(device)
        self.layers = [layer.to(self.device) for layer in layers]
        self.objective = objective
        self.optimizers = [make_sgd(layer.parameters(), optim_cfg) for layer in self.layers]
        self.steps = 0

    def __len__(self) -> int:
        return len(self.layers)

    def train_step(self, x: Tensor, targets: BatchTargets) -> tuple[Tensor, Tensor]:
        """One local HSIC step of every layer in order.

        Returns the stage's detached output and a [layers, 3] tensor of (loss, nhsic_zx, nhsic_zy).
        """
        x = x.to(self.device, non_blocking=True)
        targets = targets.to(self.device)
        stats = []
        for layer, optimizer in zip(self.layers, self.optimizers):
            layer.train()
            z = layer(x.detach())
            terms = self.objective.layer_loss(z, targets)
            optimizer.zero_grad(set_to_none=True)
            terms.loss.backward()
            optimizer.step()
            stats.append(torch.stack([terms.loss.detach(), terms.nhsic_zx, terms.nhsic_zy]))
            x = z.detach()
        self.steps += 1
        return x, torch.stack(stats)

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        """Eval-mode output (BatchNorm on running statistics) for evaluation and the format head."""
        x = x.to(self.device, non_blocking=True)
        for layer in self.layers:
            x = layer.eval()(x)
        return x

    @torch.no_grad()
    def measure(self, x: Tensor, targets: BatchTargets) -> tuple[Tensor, Tensor]:
        """Eval-mode output and each layer's (nhsic_zx, nhsic_zy): the information plane on a fixed batch."""
        x = x.to(self.device, non_blocking=True)
        targets = targets.to(self.device)
        stats = []
        for layer in self.layers:
            x = layer.eval()(x)
            terms = self.objective.layer_loss(x, targets)
            stats.append(torch.stack([terms.nhsic_zx, terms.nhsic_zy]))
        return x, torch.stack(stats)

    def state_dict(self) -> dict[str, Any]:
        return {
            "layers": [layer.state_dict() for layer in self.layers],
            "optimizers": [opt.state_dict() for opt in self.optimizers],
            "steps": self.steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["layers"]) != len(self.layers):
            raise ValueError(f"checkpoint holds {len(state['layers'])} layers, this stage has {len(self.layers)}")
        for layer, layer_state in zip(self.layers, state["layers"]):
            layer.load_state_dict(layer_state)
        for opt, opt_state in zip(self.optimizers, state["optimizers"]):
            opt.load_state_dict(opt_state)
        self.steps = state["steps"]

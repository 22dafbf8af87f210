"""The format head: one linear layer trained with SGD and cross-entropy on detached network outputs.

It only ever sees features as data (detached tensors), so no gradient can reach an HSIC layer.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from hsic_ray.config import HeadConfig
from hsic_ray.models import build_head
from hsic_ray.stage_step import make_sgd


class FormatHead:
    def __init__(self, in_features: int, num_classes: int, cfg: HeadConfig, device: torch.device | str = "cpu"):
        self.cfg = cfg
        self.device = torch.device(device)
        self.head = build_head(in_features, num_classes).to(self.device)
        self.optimizer = make_sgd(self.head.parameters(), cfg)

    def step(self, features: Tensor, labels: Tensor) -> float:
        """One SGD step on a batch (the concurrent head, during HSIC training); its loss."""
        return self._step(features.detach().to(self.device), labels.to(self.device)).item()

    def _step(self, features: Tensor, labels: Tensor) -> Tensor:
        self.head.train()
        loss = F.cross_entropy(self.head(features), labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def fit(self, features: Tensor, labels: Tensor, seed: int) -> list[float]:
        """Train `head.epochs` epochs on precomputed features (the frozen network's output), in an order drawn
        from `seed`; returns the mean loss per epoch. The features go to the head's device once, and each
        epoch's losses come back once: on a GPU a read per step would wait for every step."""
        rng = np.random.default_rng(seed)
        features, labels = features.detach().to(self.device), labels.to(self.device)
        n = features.shape[0]
        epoch_losses = []
        for _ in range(self.cfg.epochs):
            order = torch.from_numpy(rng.permutation(n)).to(self.device)
            losses = [self._step(features[idx], labels[idx]) for idx in order.split(self.cfg.batch_size)]
            epoch_losses.append(torch.stack(losses).double().mean().item())
        return epoch_losses

    @torch.no_grad()
    def logits(self, features: Tensor) -> Tensor:
        self.head.eval()
        return self.head(features.to(self.device)).cpu()

    def state_dict(self) -> dict[str, Any]:
        return {"head": self.head.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])

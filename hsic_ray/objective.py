"""The HSIC-bottleneck objective of one layer, with the batch-only parts computed once per batch.

loss_i = dep(Z_i, X) - beta * dep(Z_i, Y), where dep is the chosen estimator (nHSIC for "cca").

The kernels of X and Y (and their estimator factors: centring, and for cca a Cholesky solve) depend only
on the batch, so `HSICObjective.targets` computes them once and every layer reuses them. The authors'
schedule rebuilds the X and Y kernels and solves for every layer at every step: per layer it builds
three kernels (X with 784-3072 features) and does four m x m solves; here a layer builds one kernel
(its own Z) and does one Cholesky solve, and the batch pays two more solves once for all layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor
from torch.nn import functional as F

from hsic_ray.config import HSICConfig
from hsic_ray.hsic import Estimator, gaussian_kernel, make_estimator


@dataclass
class BatchTargets:
    """The per-batch factors every layer's loss compares its output against."""

    x_factor: Optional[Tensor]  # None when the estimator compresses against Z itself (plausible)
    y_factor: Tensor

    def to(self, device: torch.device | str) -> "BatchTargets":
        x = None if self.x_factor is None else self.x_factor.to(device, non_blocking=True)
        return BatchTargets(x, self.y_factor.to(device, non_blocking=True))


@dataclass
class LayerLoss:
    loss: Tensor
    nhsic_zx: Tensor
    nhsic_zy: Tensor


class HSICObjective:
    def __init__(self, cfg: HSICConfig, num_classes: int):
        self.cfg = cfg
        self.num_classes = num_classes
        self.estimator: Estimator = make_estimator(cfg.estimator, cfg.eps)

    def _factor(self, v: Tensor) -> Tensor:
        try:
            return self.estimator.factor(gaussian_kernel(v, self.cfg.sigma))
        except FloatingPointError:
            if v.dtype == torch.float64:
                raise
            # Badly scaled activations (eval-mode BatchNorm on young running statistics, deep in a net) can
            # lose the kernel's positive definiteness to float32 rounding; float64 restores it.
            return self.estimator.factor(gaussian_kernel(v.double(), self.cfg.sigma)).to(v.dtype)

    @torch.no_grad()
    def targets(self, x: Tensor, labels: Tensor) -> BatchTargets:
        """X's and Y's factors for one batch (x: raw inputs, labels: integer classes)."""
        y = F.one_hot(labels.long(), self.num_classes).to(x.dtype)
        x_factor = None if self.estimator.self_input else self._factor(x)
        return BatchTargets(x_factor, self._factor(y))

    def layer_loss(self, z: Tensor, targets: BatchTargets) -> LayerLoss:
        z_factor = self._factor(z)
        x_factor = z_factor if targets.x_factor is None else targets.x_factor
        zx = self.estimator.dependence(z_factor, x_factor)
        zy = self.estimator.dependence(z_factor, targets.y_factor)
        return LayerLoss(zx - self.cfg.beta * zy, zx.detach(), zy.detach())

"""The HSIC-bottleneck objective of a stage's layers, with the batch-only parts computed once per batch.

loss_i = dep(Z_i, X) - beta * dep(Z_i, Y), where dep is the chosen estimator (nHSIC for "cca").

The kernels of X and Y (and their estimator factors: centring, and for cca a Cholesky solve) depend only
on the batch, so `HSICObjective.targets` computes them once and every layer reuses them. The authors'
schedule rebuilds the X and Y kernels and solves for every layer at every step: per layer it builds
three kernels (X with 784-3072 features) and does four m x m solves; here a layer builds one kernel
(its own Z), and `stage_losses` treats all of a stage's layers as one batched [layers, m, m] problem.

For cca the loss is taken in closed form. With A = Kc + eps m I, R_Z = Kc A^-1 = I - eps m A^-1, so

    <R_Z, R_X> - beta <R_Z, R_Y> = tr(M) - eps m <A^-1, M>,    M = R_X - beta R_Y,

where M depends only on the batch: per layer one Cholesky, one inverse and an inner product, and a
backward of two m x m products (`hsic_ray.hsic.cca_inner`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor
from torch.nn import functional as F

from hsic_ray.config import HSICConfig
from hsic_ray.hsic import Estimator, cca_inner, gaussian_kernel, make_estimator, not_positive_definite, trace


@dataclass
class BatchTargets:
    """The per-batch factors every layer's loss compares its output against."""

    x_factor: Optional[Tensor]  # None when the estimator compresses against Z itself (plausible)
    y_factor: Tensor

    def to(self, device: torch.device | str) -> "BatchTargets":
        x = None if self.x_factor is None else self.x_factor.to(device, non_blocking=True)
        return BatchTargets(x, self.y_factor.to(device, non_blocking=True))


@dataclass
class StageLosses:
    """Each layer's local loss and its two dependence terms, for a stage's layers at once."""

    loss: Tensor  # [layers], differentiable with respect to each layer's output
    nhsic_zx: Tensor  # [layers], detached
    nhsic_zy: Tensor  # [layers], detached
    failed: Tensor  # [layers] bool: the layer's kernel system was not positive definite (its loss has no gradient)


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
            # Badly scaled inputs can lose the kernel's positive definiteness to float32 rounding; float64
            # restores it.
            return self.estimator.factor(gaussian_kernel(v.double(), self.cfg.sigma)).to(v.dtype)

    @torch.no_grad()
    def targets(self, x: Tensor, labels: Tensor) -> BatchTargets:
        """X's and Y's factors for one batch (x: raw inputs, labels: integer classes)."""
        y = F.one_hot(labels.long(), self.num_classes).to(x.dtype)
        x_factor = None if self.estimator.self_input else self._factor(x)
        return BatchTargets(x_factor, self._factor(y))

    def stage_losses(self, zs: Sequence[Tensor], targets: BatchTargets, dtype: torch.dtype | None = None) -> StageLosses:
        """Every layer's loss from its output, as one batched computation; nothing is read back to the host.

        `dtype` computes the kernels and their algebra in another precision (float64 after float32 rounding
        cost a kernel its positive definiteness); the losses come back in that precision.
        """
        kernels = torch.stack([gaussian_kernel(z if dtype is None else z.to(dtype), self.cfg.sigma) for z in zs])
        x_factor = None if targets.x_factor is None else targets.x_factor.to(kernels.dtype)
        y_factor = targets.y_factor.to(kernels.dtype)
        if self.estimator.name == "cca":
            return self._cca_losses(kernels, x_factor, y_factor)
        z_factors = self.estimator.factor(kernels)
        zx = self.estimator.dependence(z_factors, z_factors if x_factor is None else x_factor)
        zy = self.estimator.dependence(z_factors, y_factor)
        failed = torch.zeros(len(zs), dtype=torch.bool, device=kernels.device)
        return StageLosses(zx - self.cfg.beta * zy, zx.detach(), zy.detach(), failed)

    def _cca_losses(self, kernels: Tensor, x_factor: Tensor, y_factor: Tensor) -> StageLosses:
        # <R_Z, T> = tr(T) - eps m <A^-1, T> for each of T = M, R_X, R_Y; only M's carries a gradient.
        factors = torch.stack([x_factor - self.cfg.beta * y_factor, x_factor, y_factor])
        inner, failed = cca_inner(kernels, factors, self.cfg.eps)
        terms = trace(factors) - (self.cfg.eps * kernels.shape[-1]) * inner
        return StageLosses(terms[:, 0], terms[:, 1].detach(), terms[:, 2].detach(), failed)

    @torch.no_grad()
    def dependence(self, zs: Sequence[Tensor], targets: BatchTargets) -> Tensor:
        """[layers, 2] of (nhsic_zx, nhsic_zy), checked: recomputed in float64 where float32 rounding broke a
        kernel's positive definiteness; FloatingPointError where float64 could not either."""
        terms = self.stage_losses(zs, targets)
        if bool(terms.failed.any()):
            terms = self.stage_losses(zs, targets, torch.float64)
            if bool(terms.failed.any()):
                raise not_positive_definite("hsic_cca")
        return torch.stack([terms.nhsic_zx, terms.nhsic_zy], dim=1).to(zs[0].dtype)

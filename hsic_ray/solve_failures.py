"""Where a stage's kernel systems failed to be positive definite, and the precision its kernels use since.

A stage step never reads back to the host, so a failed Cholesky solve is only counted on the device, per
layer (the layer gets no HSIC gradient on that step). `SolveFailures.check` reads the counts where the
caller synchronises anyway (log steps, checkpoints): after failures in float32 the stage computes its kernels
in float64 from then on; a failure in float64, or a batch's factors that failed (computed in float64
already), stops the run with an error naming `hsic.eps` (docs/design.md, "The stage step").
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from hsic_ray.hsic import not_positive_definite
from hsic_ray.objective import KernelFactors, factors_failed

log = logging.getLogger("hsic_ray")


class SolveFailures:
    def __init__(self, num_layers: int, device: torch.device):
        # Steps since the last check in which each layer's kernel system was not positive definite; updated
        # in place, so a captured CUDA graph keeps writing to it.
        self.counts = torch.zeros(num_layers, dtype=torch.int32, device=device)
        # Whether any batch's factors, computed on the device unchecked (`HSICObjective.kernel_factors`), failed.
        self._factors_failed = torch.zeros((), dtype=torch.bool, device=device)
        self.kernel_dtype: torch.dtype | None = None  # None: the activations' own; float64 after a failure

    def record_factors(self, factors: KernelFactors) -> None:
        if factors.failed is not None:
            self._factors_failed |= factors.failed

    def record(self, failed: Tensor) -> None:
        """Count a step's per-layer failures (a [layers] bool tensor on the device)."""
        self.counts += failed

    def check(self) -> bool:
        """Read the counts (a host sync). Returns True when the stage has just switched to float64 kernels;
        raises after failures in float64 or factors that failed."""
        if bool(self._factors_failed):
            raise factors_failed()
        failed = self.counts.nonzero().flatten().tolist()
        if not failed:
            return False
        self.counts.zero_()
        if self.kernel_dtype == torch.float64:
            raise not_positive_definite(f"hsic_cca (layers {failed} of this stage, in float64)")
        log.warning(
            "kernel systems of layers %s of this stage lost positive definiteness in float32; "
            "computing kernels in float64 from now on",
            failed,
        )
        self.kernel_dtype = torch.float64
        return True

    def state(self) -> str | None:
        return None if self.kernel_dtype is None else str(self.kernel_dtype)

    def load_state(self, kernel_dtype: str | None) -> None:
        self.kernel_dtype = torch.float64 if kernel_dtype == "torch.float64" else None

"""The HSIC-bottleneck objective of a stage's layers, with the batch-only parts computed once per batch.

loss_i = dep(Z_i, X) - beta * dep(Z_i, Y), where dep is the chosen estimator (nHSIC for "cca").

The kernels of X and Y (and their estimator factors: centring, and for cca a Cholesky solve) depend only
on the batch, so `HSICObjective.kernel_factors` computes them once and every layer reuses them. The labels'
cca factor has a closed form (`hsic.one_hot_cca_factor_ex`): a C x C solve instead of an m x m one. The authors'
schedule rebuilds the X and Y kernels and solves for every layer at every step: per layer it builds
three kernels (X with 784-3072 features) and does four m x m solves; here a layer builds one kernel
(its own Z), and `stage_losses` treats all of a stage's layers as one batched [layers, m, m] problem.

For cca the loss is taken in closed form. With A = Kc + eps m I, R_Z = Kc A^-1 = I - eps m A^-1, so

    <R_Z, R_X> - beta <R_Z, R_Y> = tr(M) - eps m <A^-1, M>,    M = R_X - beta R_Y,

where M depends only on the batch: per layer one Cholesky, one inverse and an inner product, and a
backward of two m x m products (`hsic_ray.hsic.cca_inner`). The inner products with R_X and R_Y are taken
separately (the same products, one target fewer than with M beside them), so each layer can weigh its
nHSIC(Z, X) term on its own.

Extensions beyond the paper, each off unless set (and off in every `paper_*` preset):
`hsic.layer_sigma`, a kernel width for the layers' outputs apart from the inputs' and labels';
`hsic.input_weight_first`, a per-layer weight on nHSIC(Z, X) that rises linearly from the first HSIC
layer to 1 at the last. Below 0 it makes early layers keep information about the input instead of
compressing it, the way InfoPro (Wang et al., ICLR 2021) asks early layers of locally trained networks
to: a layer cannot recover what the layers below it dropped. And `hsic.leave_one_out`: cca's nHSIC(Z, T)
is the in-sample fit of kernel ridge regression from Z to T's directions on the batch, which a layer can
raise by spreading its output over more dimensions that fit only that batch; scored on samples left out
of the fit instead, it cannot (same Cholesky and inverse, one division more). And `hsic.max_kernel_features`:
a conv layer's kernel on its output average-pooled over space to at most that many features (`kernel_view`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

from hsic_ray.config import HSICConfig
from hsic_ray.hsic import (
    Estimator,
    cca_inner,
    checked_factor,
    gaussian_kernel,
    make_estimator,
    not_positive_definite,
    trace,
)


@dataclass
class KernelFactors:
    """The per-batch factors every layer's loss compares its output against."""

    x_factor: Tensor | None  # None when the estimator compresses against Z itself (plausible)
    y_factor: Tensor
    # On a GPU: a bool on the device, True where a factor's kernel system was not positive definite, for the
    # stage to check where it reads back anyway (`StageStep.check_solves`). None: checked already.
    failed: Tensor | None = None

    def to(self, device: torch.device | str) -> KernelFactors:
        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device, non_blocking=True)

        return KernelFactors(move(self.x_factor), move(self.y_factor), move(self.failed))

    def unbind(self) -> list[KernelFactors]:
        """A stack of batches' factors ([n, m, m] each, flags [n]) as each batch's own (views of the stack)."""

        def each(t: Tensor | None) -> Sequence[Tensor | None]:
            return [None] * len(self.y_factor) if t is None else t.unbind()

        return [KernelFactors(*parts) for parts in zip(each(self.x_factor), self.y_factor.unbind(), each(self.failed))]


def factors_failed() -> FloatingPointError:
    """The error for factors whose `failed` flag was set: float64 could not make their kernel system
    positive definite either."""
    return not_positive_definite("hsic_cca (the kernel of a batch's inputs or labels, in float64)")


# A group's float64 m x m systems, several copies each, held at once: auto groups (`factor_group_size`) keep
# one copy of the group's under this.
_AUTO_GROUP_BYTES = 64 * 2**20
AUTO_FACTOR_GROUP = 8


def factor_group_size(setting: int | None, device: torch.device | str, batch_size: int) -> int:
    """How many batches' factors are computed in one call (`train.factor_group`): the setting; by default,
    on a GPU up to AUTO_FACTOR_GROUP, as many as keep the group's float64 systems under _AUTO_GROUP_BYTES, and
    1 on a CPU, where a solve costs its arithmetic, which batching does not reduce."""
    if setting is not None:
        return setting
    if torch.device(device).type != "cuda":
        return 1
    return max(1, min(AUTO_FACTOR_GROUP, _AUTO_GROUP_BYTES // (8 * batch_size**2)))


def _either(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    """Two failed flags as one: set where either is; None where neither can fail."""
    if a is None or b is None:
        return b if a is None else a
    return a | b


@dataclass
class StageLosses:
    """Each layer's local loss and its two dependence terms, for a stage's layers at once."""

    loss: Tensor  # [layers], differentiable with respect to each layer's output
    nhsic_zx: Tensor  # [layers], detached
    nhsic_zy: Tensor  # [layers], detached
    failed: Tensor  # [layers] bool: the layer's kernel system was not positive definite (its loss has no gradient)


def kernel_pool(shape: Sequence[int], max_features: int | None) -> int:
    """The side of the square window that average-pools a layer output of `shape` (per sample) to at most
    `max_features` for its kernel (windows cut off at the map's edge); 1 for no pooling: flat outputs, maps
    that fit, or max_features None. A map whose channels alone exceed max_features pools to one cell."""
    if max_features is None or len(shape) != 3 or math.prod(shape) <= max_features:
        return 1
    channels, height, width = shape
    k = 2
    while k < max(height, width) and channels * math.ceil(height / k) * math.ceil(width / k) > max_features:
        k += 1
    return k


def kernel_features(shape: Sequence[int], max_features: int | None) -> int:
    """How many features a layer output of `shape` has in its kernel's view (`kernel_view`)."""
    k = kernel_pool(shape, max_features)
    if k == 1:
        return math.prod(shape)
    channels, height, width = shape
    return channels * math.ceil(height / k) * math.ceil(width / k)


def kernel_view(z: Tensor, max_features: int | None) -> Tensor:
    """A batch of a layer's outputs as its kernel sees them: conv maps [m, c, h, w] wider than `max_features`
    average-pooled over k x k windows (`kernel_pool`); anything else unchanged.

    A kernel costs m^2 d for d features: on a narrow conv layer's large map (16 x 28 x 28) about as much as the
    layer's own 3x3 conv. Averages keep the per-feature squared distance of spatially smooth differences, so
    the dimension-scaled bandwidth means the same on the pooled view; pixel-level noise is damped. Off by
    default (`hsic.max_kernel_features`): on a CPU the pooling's own passes take back part of what it saves,
    and it changes the objective (docs/design.md, "The plain conv net and its kernels")."""
    k = kernel_pool(z.shape[1:], max_features)
    return z if k == 1 else F.avg_pool2d(z, k, k, ceil_mode=True)


def input_weights(first: float, layers: range, num_layers: int) -> list[float]:
    """The weight on nHSIC(Z, X) of each of `layers` among `num_layers` HSIC layers: `first` at layer 0,
    rising linearly to 1 at the last (1 everywhere when first is 1, the paper's objective)."""
    if num_layers < 2:
        return [1.0 for _ in layers]
    return [first + (1.0 - first) * i / (num_layers - 1) for i in layers]


class HSICObjective:
    def __init__(self, cfg: HSICConfig, num_classes: int, layers: range | None = None, num_layers: int = 0):
        """`layers` places a stage's layers among the network's `num_layers` HSIC layers, for their weights on
        nHSIC(Z, X) (`hsic.input_weight_first`); an objective that computes factors and measures
        dependence, but trains no layer, leaves it out."""
        self.cfg = cfg
        self.num_classes = num_classes
        self.estimator: Estimator = make_estimator(cfg.estimator, cfg.eps)
        self.layer_sigma = cfg.sigma if cfg.layer_sigma is None else cfg.layer_sigma
        self.max_kernel_features = cfg.max_kernel_features
        self._input_weights = None if layers is None else input_weights(cfg.input_weight_first, layers, num_layers)
        self._weight_tensors: dict[tuple[torch.device, torch.dtype], Tensor] = {}

    def _factor(self, v: Tensor, stacked: bool) -> Tensor:
        try:
            return self.estimator.factor(gaussian_kernel(v, self.cfg.sigma, stacked))
        except FloatingPointError:
            if v.dtype == torch.float64:
                raise
            # Badly scaled inputs can lose the kernel's positive definiteness to float32 rounding; float64
            # restores it.
            return self.estimator.factor(gaussian_kernel(v.double(), self.cfg.sigma, stacked)).to(v.dtype)

    def _factor_on_device(self, v: Tensor, stacked: bool) -> tuple[Tensor, Tensor | None]:
        """The factor computed in float64 from the start, with its failed flag left on the device.

        On a GPU, checking the solve on the host (for the float32 -> float64 retry of `_factor`) makes the
        loop wait for every step queued before it; float64 costs a GPU little at batch size and needs no
        retry, so nothing is read back and the loop runs ahead of the device."""
        kernel = gaussian_kernel(v.double(), self.cfg.sigma, stacked)
        if self.estimator.factor_ex is None:
            return self.estimator.factor(kernel).to(v.dtype), None
        factor, failed = self.estimator.factor_ex(kernel)
        return factor.to(v.dtype), failed

    @torch.no_grad()
    def kernel_factors(self, x: Tensor, labels: Tensor, host_free: bool | None = None) -> KernelFactors:
        """X's and Y's factors for one batch (x: raw inputs, labels: integer classes). Checked here, or with
        `host_free` (default: on CUDA) computed in float64 with their `failed` flag left on the device."""
        return self._kernel_factors(x, labels, host_free, stacked=False)

    @torch.no_grad()
    def group_kernel_factors(
        self, xs: Sequence[Tensor], labels: Sequence[Tensor], host_free: bool | None = None
    ) -> list[KernelFactors]:
        """`kernel_factors` of each of a group of equal-sized batches, computed together: every kernel and
        solve is one batched call over the group, where a GPU would take one call about as long for each batch.
        Each batch's failed flag is its own."""
        if len(xs) == 1:
            return [self.kernel_factors(xs[0], labels[0], host_free)]
        return self._kernel_factors(torch.stack(list(xs)), torch.stack(list(labels)), host_free, stacked=True).unbind()

    def _kernel_factors(self, x: Tensor, labels: Tensor, host_free: bool | None, stacked: bool) -> KernelFactors:
        host_free = x.is_cuda if host_free is None else host_free
        y = F.one_hot(labels.long(), self.num_classes).to(x.dtype)
        y_factor, y_failed = self._label_factor(y, host_free, stacked)
        if self.estimator.self_input:
            return KernelFactors(None, y_factor, y_failed)
        x_factor, x_failed = self._general_factor(x, host_free, stacked)
        return KernelFactors(x_factor, y_factor, _either(x_failed, y_failed))

    def _general_factor(self, v: Tensor, host_free: bool, stacked: bool) -> tuple[Tensor, Tensor | None]:
        """The factor of `v`'s kernel by the estimator's m x m solve, and its failed flag (None: checked here)."""
        return self._factor_on_device(v, stacked) if host_free else (self._factor(v, stacked), None)

    def _label_factor(self, y: Tensor, host_free: bool, stacked: bool) -> tuple[Tensor, Tensor | None]:
        """The factor of one-hot labels `y` and its failed flag (None: checked), in closed form where the
        estimator has one (cca: a C x C solve instead of an m x m one)."""
        if self.estimator.one_hot_factor_ex is None or self.cfg.sigma is None:
            return self._general_factor(y, host_free, stacked)
        factor, failed = self.estimator.one_hot_factor_ex(y, self.cfg.sigma)
        if host_free:
            return factor, failed
        return checked_factor(factor, failed, "hsic_cca (the kernel of a batch's labels)"), None

    def stage_losses(
        self, zs: Sequence[Tensor], factors: KernelFactors, dtype: torch.dtype | None = None
    ) -> StageLosses:
        """Every layer's loss from its output, as one batched computation; nothing is read back to the host.

        `dtype` computes the kernels and their algebra in another precision (float64 after float32 rounding
        cost a kernel its positive definiteness); the losses come back in that precision.
        """
        zx, zy, failed = self._dependences(zs, factors, dtype, self.cfg.leave_one_out)
        return StageLosses(self._weights_like(zx) * zx - self.cfg.beta * zy, zx.detach(), zy.detach(), failed)

    def _dependences(
        self, zs: Sequence[Tensor], factors: KernelFactors, dtype: torch.dtype | None, leave_one_out: bool = False
    ) -> tuple[Tensor, Tensor, Tensor]:
        """[layers] nHSIC(Z, X) and nHSIC(Z, Y), both differentiable in Z, and the failed-solve flags."""
        views = [kernel_view(z, self.max_kernel_features) for z in zs]
        kernels = torch.stack([gaussian_kernel(v if dtype is None else v.to(dtype), self.layer_sigma) for v in views])
        x_factor = None if factors.x_factor is None else factors.x_factor.to(kernels.dtype)
        y_factor = factors.y_factor.to(kernels.dtype)
        if self.estimator.name == "cca":
            # <R_Z, T> = tr(T) - eps m <A^-1, T> for T = R_X, R_Y; left out: tr(T) - <diag(A^-1)^-1 A^-1, T>.
            factors = torch.stack([x_factor, y_factor])
            inner, failed = cca_inner(kernels, factors, self.cfg.eps, leave_one_out=leave_one_out)
            scale = 1.0 if leave_one_out else self.cfg.eps * kernels.shape[-1]
            terms = trace(factors) - scale * inner
            return terms[:, 0], terms[:, 1], failed
        z_factors = self.estimator.factor(kernels)
        zx = self.estimator.dependence(z_factors, z_factors if x_factor is None else x_factor)
        zy = self.estimator.dependence(z_factors, y_factor)
        return zx, zy, torch.zeros(len(zs), dtype=torch.bool, device=kernels.device)

    def _weights_like(self, zx: Tensor) -> Tensor | float:
        if self.cfg.input_weight_first == 1.0:
            return 1.0
        if self._input_weights is None:
            raise ValueError(
                "hsic.input_weight_first needs each layer's place in the network: build the "
                "stage's HSICObjective with its layers and num_layers"
            )
        # Made once per device and precision, outside any CUDA graph capture (warm-up steps come first).
        key = (zx.device, zx.dtype)
        if key not in self._weight_tensors:
            self._weight_tensors[key] = torch.tensor(self._input_weights, device=zx.device, dtype=zx.dtype)
        return self._weight_tensors[key]

    @torch.no_grad()
    def dependence(self, zs: Sequence[Tensor], factors: KernelFactors) -> Tensor:
        """[layers, 2] of (nhsic_zx, nhsic_zy), checked: recomputed in float64 where float32 rounding broke a
        kernel's positive definiteness; FloatingPointError where float64 could not either. Always the paper's
        nHSIC, whatever the layers train on (hsic.leave_one_out), so information planes compare across runs."""
        zx, zy, failed = self._dependences(zs, factors, None)
        if bool(failed.any()):
            zx, zy, failed = self._dependences(zs, factors, torch.float64)
            if bool(failed.any()):
                raise not_positive_definite("hsic_cca")
        return torch.stack([zx, zy], dim=1).to(zs[0].dtype)

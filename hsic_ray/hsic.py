"""Kernels and HSIC estimators: pure, differentiable torch, on any device and float dtype.

Every estimator here is an inner product of two per-variable "factors" of the kernel matrices:

    hsic_biased(K, L) = <Kc, Lc> / (m-1)^2
    hsic_cka(K, L)    = <Kc / |Kc|, Lc / |Lc|>
    hsic_cca(K, L)    = <R_K, R_L>,   R_K = Kc (Kc + eps m I)^-1

so a factor that depends only on the batch (the input X, the labels Y) can be computed once and reused by
every layer (see `Estimator` and `hsic_ray.objective`). No m x m matrix product is ever formed for centring.

Everything from the kernel on also accepts a stack of kernels, [..., m, m] (one per layer of a stage, or one per
batch of a group whose factors are computed together), and `cca_inner` gives the training step the cca estimator
in closed form without a host round trip.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from hsic_ray.config import ESTIMATORS

MEDIAN_SIGMA_FLOOR = 1e-2


def _flatten(x: Tensor, stacked: bool = False) -> Tensor:
    """Samples [m, ...] as rows [m, d]; with `stacked`, batches [n, m, ...] as [n, m, d]."""
    return x.flatten(2) if stacked else x.reshape(x.shape[0], -1)


def _diagonal_view(a: Tensor) -> Tensor:
    return a.diagonal(dim1=-2, dim2=-1)


def _centred_distances(x: Tensor) -> tuple[Tensor, Tensor]:
    """(x - mean(x), raw squared distances) of the rows of x [..., m, d], the latter possibly with tiny
    negatives from rounding."""
    # Distances are translation invariant; removing the sample mean first keeps |a|^2 + |b|^2 - 2ab from
    # cancelling catastrophically when the features share a large offset (in float32, features of
    # 10 +- 0.1 otherwise lose ~0.5% of every distance, and duplicates get a kernel value below 1).
    xc = x - x.mean(dim=-2, keepdim=True)
    gram = xc @ xc.mT
    sq = _diagonal_view(gram)
    return xc, (sq[..., :, None] + sq[..., None, :]).sub_(gram, alpha=2.0)


def _clean_distances_(d: Tensor) -> Tensor:
    """Raw squared distances with rounding's tiny negatives (and non-zero diagonal), where the true distance
    is 0, made 0, in place."""
    d.clamp_min_(0.0)
    _diagonal_view(d).zero_()
    return d


def squared_distances(x: Tensor) -> Tensor:
    """Pairwise squared Euclidean distances between the rows of `x` (flattened per sample)."""
    _, d = _centred_distances(_flatten(x))
    return _clean_distances_(d)


def _median_distance(d: Tensor) -> Tensor:
    """The median distance between distinct samples of each [..., m, m] matrix of squared distances."""
    rows, cols = torch.triu_indices(d.shape[-1], d.shape[-1], offset=1, device=d.device)
    return d[..., rows, cols].sqrt().median(dim=-1).values.clamp_min(MEDIAN_SIGMA_FLOOR)


def median_bandwidth(x: Tensor) -> Tensor:
    """The median heuristic as a 0-d tensor on x's device (no host round trip): the median pairwise distance
    between distinct samples, floored at 1e-2."""
    return _median_distance(squared_distances(x.detach()))


def median_sigma(x: Tensor) -> float:
    """`median_bandwidth` as a Python float."""
    return float(median_bandwidth(x))


class _GaussianKernel(torch.autograd.Function):
    """The kernel with a hand-written backward: the training step's largest cost after the layers."""

    @staticmethod
    def forward(ctx, x: Tensor, sigma: float | None) -> Tensor:
        xc, d = _centred_distances(x)
        clamped = d < 0
        _clean_distances_(d)
        # The median bandwidth is a constant of the batch: no gradient flows through it.
        if sigma is not None:
            scale = 1.0 / (2.0 * sigma**2 * x.shape[-1])
        else:
            scale = (0.5 / _median_distance(d) ** 2)[..., None, None]
        kernel = d.mul_(-scale).exp_()
        ctx.save_for_backward(xc, kernel, clamped)
        ctx.scale = scale
        return kernel

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        xc, kernel, clamped = ctx.saved_tensors
        # d_ij = |c_i|^2 + |c_j|^2 - 2 c_i.c_j with c = x - mean(x), so with G the gradient of the distances
        # and S = G + G^T, dL/dc = 2 (diag(S 1) - S) c: one m x m by m x d product, where autograd's Gram
        # backward takes two plus m x d elementwise passes. The diagonal cancels (d_ii = 0 identically), and
        # the rows sum to zero, so the mean's backward leaves the result unchanged.
        g = (grad * kernel).mul_(-2.0 * ctx.scale).masked_fill_(clamped, 0.0)  # 2 G
        laplacian = (g + g.mT).neg_()
        _diagonal_view(laplacian).sub_(laplacian.sum(dim=-1))
        return laplacian @ xc, None


def gaussian_kernel(x: Tensor, sigma: float | None, stacked: bool = False) -> Tensor:
    """Gaussian kernel exp(-|a-b|^2 / (2 sigma^2 d)) of samples x [m, ...], with the bandwidth scaled by their
    dimension d; with `stacked`, one kernel [n, m, m] per batch of x [n, m, ...].

    sigma=None uses the median heuristic without dimension scaling, as the authors' code falls back to.
    """
    if sigma is not None and sigma <= 0:
        raise ValueError(f"sigma must be positive or None (median heuristic), got {sigma}")
    return _GaussianKernel.apply(_flatten(x, stacked), sigma)


def center(k: Tensor) -> Tensor:
    """H K H with H = I - 11^T/m, by subtracting row and column means and adding the grand mean: O(m^2)."""
    row = k.mean(dim=-1, keepdim=True)
    col = k.mean(dim=-2, keepdim=True)
    # Two passes over k's stack and one new tensor: a deep stage's [layers, m, m] outgrows the caches, and each
    # pass costs its memory traffic.
    return (k - row).sub_(col - row.mean(dim=-2, keepdim=True))


def _inner(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).sum(dim=(-2, -1))


def trace(a: Tensor) -> Tensor:
    return _diagonal_view(a).sum(-1)


def _regularise_(kc: Tensor, eps: float) -> Tensor:
    """Kc + eps m I, in place (Cholesky reads its lower triangle only)."""
    _diagonal_view(kc).add_(eps * kc.shape[-1])
    return kc


def spd_inverse(systems: Tensor, host_free: bool | None = None) -> tuple[Tensor, Tensor]:
    """The inverses of symmetric positive definite matrices [n, m, m] by Cholesky, and a bool [n] marking
    those that were not positive definite (their inverse is returned as zeros, so they get no gradient).

    `host_free` (default: on CUDA) inverts through a triangular solve and a product: cholesky_inverse checks
    its status on the host, which would stall the step and is not allowed inside a CUDA graph. Elsewhere
    LAPACK's potri does a third of that arithmetic.
    """
    chol, info = torch.linalg.cholesky_ex(systems)
    host_free = systems.is_cuda if host_free is None else host_free
    if host_free:
        eye = torch.eye(chol.shape[-1], dtype=chol.dtype, device=chol.device).expand_as(chol)
        chol_inverse = torch.linalg.solve_triangular(chol, eye, upper=False)
        inverse = chol_inverse.mT @ chol_inverse
    else:
        inverse = torch.cholesky_inverse(chol)
    failed = info != 0
    # A failed factorisation leaves inf/NaN behind: zeros instead. Off the host-free path the host may look
    # first, and spare every other system a pass.
    if host_free or failed.any():
        inverse.masked_fill_(failed[..., None, None], 0.0)
    return inverse, failed


def _per_kernel(shared: Tensor, kernels: Tensor) -> Tensor:
    return shared.expand(kernels.shape[0], *shared.shape)


class _CCAInner(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kernels: Tensor, targets: Tensor, eps: float, leave_one_out: bool) -> tuple[Tensor, Tensor]:
        inverse, failed = spd_inverse(_regularise_(center(kernels), eps))
        weights = _loo_rows(inverse) if leave_one_out else inverse
        # One product per kernel, [1, m^2] x [m^2, t]: a kernel's figures do not depend on how many kernels
        # share the call (a stage's size), as they would through one [n, m^2] x [m^2, t] product.
        inner = torch.bmm(weights.flatten(-2).unsqueeze(-2), _per_kernel(targets.flatten(-2).mT, inverse)).squeeze(-2)
        ctx.save_for_backward(inverse, targets)
        ctx.leave_one_out = leave_one_out
        ctx.mark_non_differentiable(failed)
        return inner, failed

    @staticmethod
    def backward(ctx, grad_inner: Tensor, _grad_failed: Tensor) -> tuple[Tensor, None, None, None]:
        inverse, targets = ctx.saved_tensors
        # The targets weighted by their gradients first, so each kernel costs two m x m products whatever the
        # number of targets. d<A^-1, T> = -<A^-1 T A^-1, dA> for symmetric A and T. The centring H K H is
        # linear and self-adjoint: its backward is the centring of the gradient.
        weighted = torch.bmm(-grad_inner.unsqueeze(-2), _per_kernel(targets.flatten(-2), inverse)).view_as(inverse)
        if ctx.leave_one_out:
            weighted = _loo_rows_backward(inverse, weighted)
        return center(inverse @ weighted @ inverse), None, None, None


def _diagonal(inverse: Tensor) -> Tensor:
    # A positive definite inverse has a positive diagonal; a failed solve's zeros divide by 1, staying 0.
    diag = _diagonal_view(inverse)
    return torch.where(diag > 0, diag, torch.ones_like(diag))


def _loo_rows(inverse: Tensor) -> Tensor:
    """B / diag(B) row by row: with B = (Kc + eps m I)^-1, I - that is the leave-one-out hat matrix."""
    return inverse / _diagonal(inverse).unsqueeze(-1)


def _loo_rows_backward(inverse: Tensor, grad: Tensor) -> Tensor:
    """The gradient of <B / diag(B) row by row, T> with respect to B, from T (here `grad`), symmetrised."""
    diag = _diagonal(inverse)
    # Halved before the sum with its transpose (exact: a power of two), each term in place or a row-wise dot:
    # three passes over the stack where the textbook form takes nine.
    g = grad / (2.0 * diag).unsqueeze(-1)
    _diagonal_view(g).sub_(torch.linalg.vecdot(grad, inverse) / (2.0 * diag**2))
    return g + g.mT


def cca_inner(kernels: Tensor, targets: Tensor, eps: float, leave_one_out: bool = False) -> tuple[Tensor, Tensor]:
    """<(Kc + eps m I)^-1, T_t>, Kc = H K H, for each kernel K in [n, m, m] and each symmetric target T_t in
    [t, m, m], as [n, t]; and a bool [n] marking systems that were not positive definite (their inverse
    counts as zero, so they get no gradient).

    Since R_K = Kc (Kc + eps m I)^-1 = I - eps m (Kc + eps m I)^-1, nHSIC(K, T) = tr(T) - eps m <A^-1, R_T>:
    this is the cca estimator in closed form, with one Cholesky and one inverse per kernel. Nothing is
    checked on the host: read `failed` where the caller synchronises anyway. The gradient is with respect
    to K as a symmetric matrix (only its symmetric part is meaningful, as K is symmetric).

    R_K is the hat matrix of kernel ridge regression on K (ridge eps m): nHSIC(K, T) scores how well K fits
    T's directions on the very samples it was fitted to. `leave_one_out` returns <D^-1 A^-1, T_t> with
    D = diag(A^-1) instead: I - D^-1 A^-1 is the leave-one-out hat matrix (row i predicts sample i from the
    others), so tr(T) minus it scores the fit on samples left out of it, at the cost of one division.
    """
    return _CCAInner.apply(kernels, targets, eps, leave_one_out)


def not_positive_definite(where: str) -> FloatingPointError:
    return FloatingPointError(
        f"{where}: kernel system is not positive definite; increase eps or compute the kernels in float64"
    )


# --- factors: one per variable, reusable across every estimate that involves that variable -------------


def biased_factor(k: Tensor) -> Tensor:
    return center(k) / (k.shape[-1] - 1)


def cka_factor(k: Tensor) -> Tensor:
    kc = center(k)
    # A constant variable (a layer whose units are all dead on this batch) has Kc = 0: its alignment with
    # anything is 0, not 0/0.
    return kc / torch.linalg.matrix_norm(kc, keepdim=True).clamp_min(torch.finfo(kc.dtype).tiny)


def cca_factor_ex(k: Tensor, eps: float = 1e-5) -> tuple[Tensor, Tensor]:
    """R_K = Kc (Kc + eps m I)^-1 by a Cholesky solve of the symmetric positive definite system, and a bool
    marking the kernels whose system was not positive definite (their factor is not to be used). Nothing is
    read back to the host, so on a GPU the caller does not wait for the work queued before.

    Kc and (Kc + eps m I) commute, so R_K is symmetric and equals (Kc + eps m I)^-1 Kc.
    """
    # Symmetrise: rounding in the centring can leave Kc a hair off symmetric, and R_K should not be.
    kc = center(k)
    kc = 0.5 * (kc + kc.mT)
    chol, info = torch.linalg.cholesky_ex(_regularise_(kc.clone(), eps))
    return torch.cholesky_solve(kc, chol), info != 0


def cca_factor(k: Tensor, eps: float = 1e-5) -> Tensor:
    """`cca_factor_ex`'s R_K, checked on the host: FloatingPointError where the system was not positive definite."""
    return checked_factor(*cca_factor_ex(k, eps))


def checked_factor(factor: Tensor, failed: Tensor, where: str = "hsic_cca") -> Tensor:
    """A `*_factor_ex` result read on the host: the factor, or FloatingPointError naming `where` if it failed."""
    if bool(failed.any()):
        raise not_positive_definite(where)
    return factor


def one_hot_cca_factor_ex(y: Tensor, sigma: float, eps: float = 1e-5) -> tuple[Tensor, Tensor]:
    """`cca_factor_ex` of the Gaussian kernel of one-hot labels y [..., m, C], in closed form: no m x m solve.

    Two samples' kernel is 1 in the same class and c = exp(-1 / (sigma^2 C)) in different ones, so
    K = c 11^T + (1 - c) Y Y^T and Kc = (1 - c) Yc Yc^T with Yc = H Y, the labels less their batch mean. Then
    R_K = Kc (Kc + eps m I)^-1 = Yc (Yc^T Yc + eps m / (1 - c) I)^-1 Yc^T: a C x C system, positive definite
    for any eps > 0, and O(m^2 C) work where the general factor takes O(m^3). Computed in float64, returned in
    y's dtype with the failed flag of the C x C system, unread.
    """
    *stack, m, classes = y.shape
    spread = -math.expm1(-1.0 / classes / sigma / sigma)  # 1 - c, without overflowing sigma^2
    if spread == 0.0:  # every pair's kernel is 1: Kc = 0, and so is R_K
        zeros = torch.zeros(*stack, m, m, dtype=y.dtype, device=y.device)
        return zeros, torch.full(stack, eps <= 0, device=y.device)
    y64 = y.double()
    yc = y64 - y64.mean(dim=-2, keepdim=True)
    system = yc.mT @ yc
    _diagonal_view(system).add_(eps * m / spread)
    chol, info = torch.linalg.cholesky_ex(system)
    return (yc @ torch.cholesky_solve(yc.mT, chol)).to(y.dtype), info != 0


# --- estimators -----------------------------------------------------------------------------------------


def hsic_biased(k: Tensor, l: Tensor) -> Tensor:
    """The biased HSIC estimator tr(K H L H) / (m-1)^2."""
    return _inner(biased_factor(k), biased_factor(l))


def hsic_cka(k: Tensor, l: Tensor) -> Tensor:
    """HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)): centred kernel alignment, in [0, 1]."""
    return _inner(cka_factor(k), cka_factor(l))


def hsic_cca(k: Tensor, l: Tensor, eps: float = 1e-5) -> Tensor:
    """The normalised (kernel CCA) HSIC of Fukumizu et al., tr(R_K R_L), that the authors train with."""
    return _inner(cca_factor(k, eps), cca_factor(l, eps))


def plausible_loss(kz: Tensor, ky: Tensor, gamma: float = 2.0) -> Tensor:
    """The pHSIC objective of Pogodin & Latham: HSIC(Z, Z) - gamma * HSIC(Z, Y), biased estimator."""
    fz = biased_factor(kz)
    return _inner(fz, fz) - gamma * _inner(fz, biased_factor(ky))


@dataclass(frozen=True)
class Estimator:
    """How a layer's local loss measures dependence, split so batch-only factors are computed once.

    `factor(K)` maps a kernel to its factor; the dependence of two variables is `<factor_a, factor_b>`.
    `factor_ex(K)`, where a factor can fail (cca's solve), gives the factor and a failed flag without
    checking it on the host (None: `factor` cannot fail). `one_hot_factor_ex(Y, sigma)`, where given, is
    `factor_ex` of one-hot labels' Gaussian kernel in closed form. `self_input` says the compression term is
    HSIC(Z, Z) (the plausible variant) instead of HSIC(Z, X).
    """

    name: str
    factor: Callable[[Tensor], Tensor]
    self_input: bool = False
    factor_ex: Callable[[Tensor], tuple[Tensor, Tensor]] | None = None
    one_hot_factor_ex: Callable[[Tensor, float], tuple[Tensor, Tensor]] | None = None

    def dependence(self, factor_a: Tensor, factor_b: Tensor) -> Tensor:
        return _inner(factor_a, factor_b)


def make_estimator(name: str, eps: float = 1e-5) -> Estimator:
    if name == "cca":
        return Estimator(
            "cca",
            lambda k: cca_factor(k, eps),
            factor_ex=lambda k: cca_factor_ex(k, eps),
            one_hot_factor_ex=lambda y, sigma: one_hot_cca_factor_ex(y, sigma, eps),
        )
    if name == "biased":
        return Estimator("biased", biased_factor)
    if name == "cka":
        return Estimator("cka", cka_factor)
    if name == "plausible":
        return Estimator("plausible", biased_factor, self_input=True)
    raise ValueError(f"unknown estimator {name!r}; choose one of {', '.join(ESTIMATORS)}")

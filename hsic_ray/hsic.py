"""Kernels and HSIC estimators: pure, differentiable torch, on any device and float dtype.

Every estimator here is an inner product of two per-variable "factors" of the kernel matrices:

    hsic_biased(K, L) = <Kc, Lc> / (m-1)^2
    hsic_cka(K, L)    = <Kc / |Kc|, Lc / |Lc|>
    hsic_cca(K, L)    = <R_K, R_L>,   R_K = Kc (Kc + eps m I)^-1

so a factor that depends only on the batch (the input X, the labels Y) can be computed once and reused by
every layer (see `Estimator` and `hsic_ray.objective`). No m x m matrix product is ever formed for centring.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

MEDIAN_SIGMA_FLOOR = 1e-2


def _flatten(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1)


def squared_distances(x: Tensor) -> Tensor:
    """Pairwise squared Euclidean distances between the rows of `x` (flattened per sample)."""
    x = _flatten(x)
    # Distances are translation invariant; removing the sample mean first keeps |a|^2 + |b|^2 - 2ab from
    # cancelling catastrophically when the features share a large offset (in float32, features of
    # 10 +- 0.1 otherwise lose ~0.5% of every distance, and duplicates get a kernel value below 1).
    x = x - x.mean(dim=0, keepdim=True)
    sq = (x * x).sum(dim=1)
    d = sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)
    # Rounding can leave tiny negatives (and a non-zero diagonal) where the true distance is 0.
    return d.clamp_min(0.0).fill_diagonal_(0.0)


def median_sigma(x: Tensor) -> float:
    """The median heuristic: median pairwise distance between distinct samples, floored at 1e-2."""
    d = squared_distances(x.detach())
    m = d.shape[0]
    off_diagonal = d[~torch.eye(m, dtype=torch.bool, device=d.device)]
    return max(off_diagonal.sqrt().median().item(), MEDIAN_SIGMA_FLOOR)


def gaussian_kernel(x: Tensor, sigma: float | None) -> Tensor:
    """Gaussian kernel exp(-|a-b|^2 / (2 sigma^2 d)) with the bandwidth scaled by the dimension d of x.

    sigma=None uses the median heuristic without dimension scaling, as the authors' code falls back to.
    """
    x = _flatten(x)
    d = squared_distances(x)
    if sigma is None:
        return torch.exp(-d / (2.0 * median_sigma(x) ** 2))
    if sigma <= 0:
        raise ValueError(f"sigma must be positive or None (median heuristic), got {sigma}")
    return torch.exp(-d / (2.0 * sigma**2 * x.shape[1]))


def center(k: Tensor) -> Tensor:
    """H K H with H = I - 11^T/m, by subtracting row and column means and adding the grand mean: O(m^2)."""
    row = k.mean(dim=1, keepdim=True)
    col = k.mean(dim=0, keepdim=True)
    return k - row - col + k.mean()


def _inner(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).sum()


# --- factors: one per variable, reusable across every estimate that involves that variable -------------


def biased_factor(k: Tensor) -> Tensor:
    return center(k) / (k.shape[0] - 1)


def cka_factor(k: Tensor) -> Tensor:
    kc = center(k)
    # A constant variable (a layer whose units are all dead on this batch) has Kc = 0: its alignment with
    # anything is 0, not 0/0.
    return kc / torch.linalg.matrix_norm(kc).clamp_min(torch.finfo(kc.dtype).tiny)


def cca_factor(k: Tensor, eps: float = 1e-5) -> Tensor:
    """R_K = Kc (Kc + eps m I)^-1, computed with a Cholesky solve of the symmetric positive definite system.

    Kc and (Kc + eps m I) commute, so R_K is symmetric and equals (Kc + eps m I)^-1 Kc.
    """
    kc = center(k)
    m = kc.shape[0]
    # Symmetrise: rounding in the centring can leave Kc a hair off symmetric, which Cholesky dislikes.
    kc = 0.5 * (kc + kc.T)
    system = kc + (eps * m) * torch.eye(m, dtype=kc.dtype, device=kc.device)
    chol, info = torch.linalg.cholesky_ex(system)
    if int(info) != 0:
        raise FloatingPointError(
            f"hsic_cca: kernel system is not positive definite (order {int(info)}); "
            "increase eps or compute the kernels in float64"
        )
    return torch.cholesky_solve(kc, chol)


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
    `self_input` says the compression term is HSIC(Z, Z) (the plausible variant) instead of HSIC(Z, X).
    """

    name: str
    factor: Callable[[Tensor], Tensor]
    self_input: bool = False

    def dependence(self, factor_a: Tensor, factor_b: Tensor) -> Tensor:
        return _inner(factor_a, factor_b)


ESTIMATORS = ("cca", "biased", "cka", "plausible")


def make_estimator(name: str, eps: float = 1e-5) -> Estimator:
    if name == "cca":
        return Estimator("cca", lambda k: cca_factor(k, eps))
    if name == "biased":
        return Estimator("biased", biased_factor)
    if name == "cka":
        return Estimator("cka", cka_factor)
    if name == "plausible":
        return Estimator("plausible", biased_factor, self_input=True)
    raise ValueError(f"unknown estimator {name!r}; choose one of {', '.join(ESTIMATORS)}")

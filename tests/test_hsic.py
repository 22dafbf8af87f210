"""Tests for hsic_ray.hsic: every kernel and estimator against a slow textbook implementation, properties,
gradients (finite differences), dtypes / devices, and errors.

The reference implementations below follow the estimators' definitions (Ma, Lewis & Kleijn 2020, section 2;
Gretton et al. 2005) literally (explicit loops
over pairs, the explicit centring matrix H = I - 11^T/m, explicit traces and inverses), sharing no code with
hsic.py, so an error in the fast O(m^2) formulation shows up as a mismatch.
"""

from __future__ import annotations

import dataclasses
import math
import statistics

import pytest
import torch

from hsic_ray.hsic import (
    ESTIMATORS,
    MEDIAN_SIGMA_FLOOR,
    Estimator,
    biased_factor,
    cca_factor,
    cca_factor_ex,
    center,
    cka_factor,
    gaussian_kernel,
    hsic_biased,
    hsic_cca,
    hsic_cka,
    make_estimator,
    median_sigma,
    one_hot_cca_factor_ex,
    plausible_loss,
    squared_distances,
)

F64 = torch.float64
RTOL = 1e-5
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """These tensors are tiny: intra-op threading only adds contention (10x slower on a busy 2-core box)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def randn(*shape: int, seed: int, dtype: torch.dtype = F64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=F64).to(dtype)


def close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = RTOL, atol: float = 0.0) -> None:
    torch.testing.assert_close(actual.detach().cpu().to(F64), expected.detach().cpu().to(F64), rtol=rtol, atol=atol)


# --- slow textbook references (pure python floats / explicit matrices) -----------------------------------


def _rows(x: torch.Tensor) -> list[list[float]]:
    return x.detach().cpu().to(F64).reshape(x.shape[0], -1).tolist()


def ref_squared_distances(x: torch.Tensor) -> torch.Tensor:
    rows = _rows(x)
    m = len(rows)
    out = [[sum((p - q) ** 2 for p, q in zip(rows[a], rows[b])) for b in range(m)] for a in range(m)]
    return torch.tensor(out, dtype=F64)


def ref_median_sigma(x: torch.Tensor) -> float:
    rows = _rows(x)
    m = len(rows)
    dists = [math.sqrt(sum((p - q) ** 2 for p, q in zip(rows[a], rows[b]))) for a in range(m) for b in range(a + 1, m)]
    return max(statistics.median(dists), MEDIAN_SIGMA_FLOOR)


def ref_kernel(x: torch.Tensor, sigma: float | None) -> torch.Tensor:
    rows = _rows(x)
    m, d = len(rows), len(rows[0])
    denom = 2.0 * ref_median_sigma(x) ** 2 if sigma is None else 2.0 * sigma**2 * d
    k = [[0.0] * m for _ in range(m)]
    for a in range(m):
        for b in range(m):
            k[a][b] = math.exp(-sum((p - q) ** 2 for p, q in zip(rows[a], rows[b])) / denom)
    return torch.tensor(k, dtype=F64)


def ref_h(m: int) -> torch.Tensor:
    return torch.eye(m, dtype=F64) - torch.ones(m, m, dtype=F64) / m


def ref_center(k: torch.Tensor) -> torch.Tensor:
    h = ref_h(k.shape[0])
    return h @ k.to(F64) @ h


def ref_biased(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    m = k.shape[0]
    h = ref_h(m)
    return torch.trace(k.to(F64) @ h @ l.to(F64) @ h) / (m - 1) ** 2


def ref_cka(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    return ref_biased(k, l) / torch.sqrt(ref_biased(k, k) * ref_biased(l, l))


def ref_r(k: torch.Tensor, eps: float) -> torch.Tensor:
    m = k.shape[0]
    kc = ref_center(k)
    return kc @ torch.linalg.inv(kc + eps * m * torch.eye(m, dtype=F64))


def ref_cca(k: torch.Tensor, l: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    return torch.trace(ref_r(k, eps) @ ref_r(l, eps))


def ref_plausible(kz: torch.Tensor, ky: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    return ref_biased(kz, kz) - gamma * ref_biased(kz, ky)


# --- shared data ---------------------------------------------------------------------------------------------


def pair(m: int, seed: int, dx: int = 5, dy: int = 3, dtype: torch.dtype = F64):
    """X random, Y a noisy nonlinear function of X (so the two are dependent but not identical)."""
    x = randn(m, dx, seed=seed)
    y = torch.tanh(x[:, :dy]) * 1.5 + x[:, -dy:] ** 2 * 0.3 + 0.3 * randn(m, dy, seed=seed + 1000)
    return x.to(dtype), y.to(dtype)


M_REF = 10  # 45 distinct pairs: an odd count, so the median is a single, unambiguous pair distance

ESTIMATOR_FNS = {
    "biased": (hsic_biased, ref_biased),
    "cka": (hsic_cka, ref_cka),
    "cca": (hsic_cca, ref_cca),
}


# --- 1. against the textbook formulas --------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_squared_distances_matches_reference(seed):
    x = randn(M_REF, 2, 3, seed=seed)  # per-sample tensors are flattened
    close(squared_distances(x), ref_squared_distances(x), atol=1e-12)


@pytest.mark.parametrize("offset, spread", [(0.0, 1.0), (10.0, 0.1), (1e3, 1e-3)])
def test_squared_distances_accurate_in_float32_despite_a_common_offset(offset, spread):
    # A large common offset makes |a|^2 + |b|^2 - 2 a.b cancel catastrophically in float32 unless the
    # (translation-invariant) distances are computed on mean-removed features.
    x = offset + randn(16, 8, seed=3, dtype=torch.float32) * spread
    x[5] = x[2]  # an exact duplicate
    d = squared_distances(x)
    assert d.dtype == torch.float32
    assert (d >= 0).all()
    assert (d.diagonal() == 0).all()
    exact = ref_squared_distances(x)  # float64 arithmetic on the very same float32 values
    off = ~torch.eye(16, dtype=torch.bool)
    off[2, 5] = off[5, 2] = False
    close(d[off], exact[off], rtol=1e-4)
    assert d[2, 5].item() <= 1e-5 * exact[off].min().item()
    k = gaussian_kernel(x, None)
    assert k[2, 5].item() == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_median_sigma_matches_reference(seed):
    x = randn(M_REF, 4, seed=seed) * 0.7
    assert median_sigma(x) == pytest.approx(ref_median_sigma(x), rel=RTOL)


def test_median_sigma_even_number_of_pairs_is_a_middle_distance():
    x = randn(8, 3, seed=4)  # 28 pairs: the median lies between the two middle pair distances
    dists = sorted(ref_squared_distances(x)[torch.triu_indices(8, 8, 1).unbind()].sqrt().tolist())
    lo, hi = dists[13], dists[14]
    assert lo * (1 - RTOL) <= median_sigma(x) <= hi * (1 + RTOL)


def test_median_sigma_floor_and_no_dimension_scaling():
    assert median_sigma(torch.zeros(6, 3, dtype=F64)) == MEDIAN_SIGMA_FLOOR
    assert median_sigma(randn(7, 2, seed=5) * 1e-6) == MEDIAN_SIGMA_FLOOR
    x = randn(M_REF, 4, seed=6)
    # Duplicating every coordinate doubles squared distances: sigma scales by sqrt(2) (no division by d).
    assert median_sigma(torch.cat([x, x], 1)) == pytest.approx(math.sqrt(2) * median_sigma(x), rel=RTOL)


def test_median_sigma_does_not_track_gradients():
    x = randn(M_REF, 3, seed=7).requires_grad_()
    assert isinstance(median_sigma(x), float)


@pytest.mark.parametrize("sigma", [None, 0.5, 1.0, 5.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_gaussian_kernel_matches_reference(sigma, seed):
    x = randn(M_REF, 6, seed=seed)
    close(gaussian_kernel(x, sigma), ref_kernel(x, sigma))


def test_gaussian_kernel_scales_bandwidth_by_dimension():
    x = randn(M_REF, 4, seed=8)
    # Duplicating coordinates doubles both |a-b|^2 and d: the dimension-scaled kernel is unchanged.
    close(gaussian_kernel(torch.cat([x, x], 1), 1.3), gaussian_kernel(x, 1.3), rtol=1e-12)
    # The median heuristic is not divided by d: it equals a fixed sigma of median / sqrt(d).
    close(gaussian_kernel(x, None), gaussian_kernel(x, median_sigma(x) / math.sqrt(4)), rtol=1e-12)
    assert not torch.allclose(gaussian_kernel(x, None), gaussian_kernel(x, median_sigma(x)), rtol=1e-3)


def test_center_matches_hkh():
    k = randn(M_REF, M_REF, seed=9)  # not even symmetric: the row/column-mean form must still equal HKH
    close(center(k), ref_center(k), atol=1e-12)
    kx = ref_kernel(randn(M_REF, 3, seed=10), 1.0)
    close(center(kx), ref_center(kx), atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("sigma", [1.0, None])
def test_hsic_biased_matches_reference(seed, sigma):
    x, y = pair(M_REF, seed)
    k, l = ref_kernel(x, sigma), ref_kernel(y, sigma)
    close(hsic_biased(k, l), ref_biased(k, l))
    close(hsic_biased(gaussian_kernel(x, sigma), gaussian_kernel(y, sigma)), ref_biased(k, l))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("sigma", [1.0, None])
def test_hsic_cka_matches_reference(seed, sigma):
    x, y = pair(M_REF, seed)
    k, l = ref_kernel(x, sigma), ref_kernel(y, sigma)
    close(hsic_cka(k, l), ref_cka(k, l))
    close(hsic_cka(gaussian_kernel(x, sigma), gaussian_kernel(y, sigma)), ref_cka(k, l))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("eps", [1e-5, 1e-3, 1e-1])
def test_hsic_cca_matches_reference(seed, eps):
    x, y = pair(M_REF, seed)
    k, l = ref_kernel(x, 1.0), ref_kernel(y, 1.0)
    close(hsic_cca(k, l, eps), ref_cca(k, l, eps))
    close(hsic_cca(gaussian_kernel(x, 1.0), gaussian_kernel(y, 1.0), eps), ref_cca(k, l, eps))


def test_hsic_cca_default_eps_is_1e_5():
    x, y = pair(M_REF, 11)
    k, l = ref_kernel(x, 1.0), ref_kernel(y, 1.0)
    close(hsic_cca(k, l), ref_cca(k, l, 1e-5))


@pytest.mark.parametrize("eps", [1e-5, 1e-2])
def test_cca_factor_matches_reference_and_is_symmetric(eps):
    k = ref_kernel(randn(M_REF, 4, seed=12), 1.0)
    r = cca_factor(k, eps)
    close(r, ref_r(k, eps), rtol=1e-5, atol=1e-9)
    close(r, r.T, rtol=1e-5, atol=1e-9)


def test_biased_and_cka_factors():
    k = ref_kernel(randn(M_REF, 4, seed=13), 1.0)
    close(biased_factor(k), ref_center(k) / (M_REF - 1), atol=1e-12)
    f = cka_factor(k)
    close(f, ref_center(k) / torch.linalg.norm(ref_center(k)), atol=1e-12)
    close((f * f).sum(), torch.tensor(1.0, dtype=F64))


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_cka_of_a_constant_variable_is_zero_not_nan(dtype):
    # A layer whose units are all dead on a batch maps every sample to one point: its kernel is constant.
    constant = gaussian_kernel(torch.ones(M_REF, 4, dtype=dtype), 1.0)
    other = gaussian_kernel(randn(M_REF, 4, seed=15).to(dtype), 1.0)
    value = hsic_cka(constant, other)
    assert torch.isfinite(value) and value.item() == 0.0


@pytest.mark.parametrize("gamma", [2.0, 0.5, 0.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_plausible_loss_matches_reference(gamma, seed):
    z, y = pair(M_REF, seed)
    kz, ky = ref_kernel(z, 1.0), ref_kernel(y, 1.0)
    close(plausible_loss(kz, ky, gamma), ref_plausible(kz, ky, gamma))


def test_plausible_loss_default_gamma_is_2():
    z, y = pair(M_REF, 14)
    kz, ky = ref_kernel(z, 1.0), ref_kernel(y, 1.0)
    close(plausible_loss(kz, ky), ref_plausible(kz, ky, 2.0))


@pytest.mark.parametrize("name", ESTIMATORS)
def test_estimator_dependence_matches_hsic_functions(name):
    x, y = pair(M_REF, 15)
    k, l = gaussian_kernel(x, 1.0), gaussian_kernel(y, 1.0)
    eps = 1e-3
    est = make_estimator(name, eps=eps)
    assert isinstance(est, Estimator)
    assert est.name == name
    assert est.self_input == (name == "plausible")
    got = est.dependence(est.factor(k), est.factor(l))
    expected = {
        "cca": ref_cca(k, l, eps),
        "biased": ref_biased(k, l),
        "cka": ref_cka(k, l),
        "plausible": ref_biased(k, l),  # the plausible variant measures both terms with biased HSIC
    }[name]
    close(got, expected)
    match = {"cca": lambda a, b: hsic_cca(a, b, eps), "biased": hsic_biased, "cka": hsic_cka, "plausible": hsic_biased}[
        name
    ]
    close(got, match(k, l), rtol=1e-10)
    if name == "plausible":
        fz, fy = est.factor(k), est.factor(l)
        close(est.dependence(fz, fz) - 2.0 * est.dependence(fz, fy), plausible_loss(k, l), rtol=1e-10)


def test_make_estimator_default_eps_and_frozen():
    x, y = pair(M_REF, 16)
    k, l = gaussian_kernel(x, 1.0), gaussian_kernel(y, 1.0)
    est = make_estimator("cca")
    close(est.dependence(est.factor(k), est.factor(l)), ref_cca(k, l, 1e-5))
    with pytest.raises(dataclasses.FrozenInstanceError):
        est.name = "biased"  # type: ignore[misc]
    assert set(ESTIMATORS) == {"cca", "biased", "cka", "plausible"}


# --- 2. properties -------------------------------------------------------------------------------------------


ALL_ESTIMATES = {
    "biased": hsic_biased,
    "cka": hsic_cka,
    "cca": hsic_cca,
    "cca_1e-2": lambda k, l: hsic_cca(k, l, 1e-2),
    "plausible": plausible_loss,
}


@pytest.mark.parametrize("name", list(ALL_ESTIMATES))
def test_invariant_to_joint_permutation(name):
    fn = ALL_ESTIMATES[name]
    x, y = pair(30, 17)
    p = torch.randperm(30, generator=torch.Generator().manual_seed(0))
    before = fn(gaussian_kernel(x, 1.0), gaussian_kernel(y, 1.0))
    after = fn(gaussian_kernel(x[p], 1.0), gaussian_kernel(y[p], 1.0))
    close(after, before, rtol=1e-8)
    # Permuting only one variable breaks the pairing, and the estimate with it.
    broken = fn(gaussian_kernel(x[p], 1.0), gaussian_kernel(y, 1.0))
    assert not torch.allclose(broken, before, rtol=1e-6)


def test_kernel_and_median_are_permutation_equivariant():
    x = randn(30, 4, seed=18)
    p = torch.randperm(30, generator=torch.Generator().manual_seed(1))
    for sigma in (None, 2.0):
        close(gaussian_kernel(x[p], sigma), gaussian_kernel(x, sigma)[p][:, p], rtol=1e-10, atol=1e-14)
    assert median_sigma(x[p]) == pytest.approx(median_sigma(x), rel=1e-12)


@pytest.mark.parametrize("name", ["biased", "cka", "cca", "cca_1e-2"])
def test_symmetric(name):
    fn = ALL_ESTIMATES[name]
    x, y = pair(25, 19)
    k, l = gaussian_kernel(x, 1.0), gaussian_kernel(y, 1.0)
    close(fn(k, l), fn(l, k), rtol=1e-8)


def _dependence_data(seed: int, m: int = 200):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, 3, generator=g, dtype=F64)
    dependent = torch.cat([torch.sin(2 * x), x**2], 1)  # a deterministic nonlinear function of X
    independent = torch.randn(m, 6, generator=g, dtype=F64)
    return gaussian_kernel(x, 1.0), gaussian_kernel(dependent, 1.0), gaussian_kernel(independent, 1.0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_detects_dependence_and_independence(seed):
    k, l_dep, l_ind = _dependence_data(seed)
    # biased HSIC: the dependent pair is several times the independent one (>= ~7x over 40 seeds)
    dep, ind = hsic_biased(k, l_dep).item(), hsic_biased(k, l_ind).item()
    assert dep > 4 * ind
    assert 0 <= ind < 0.1 * math.sqrt(hsic_biased(k, k).item() * hsic_biased(l_ind, l_ind).item())
    # CKA: near 0 for independent variables, clearly positive for dependent ones
    dep, ind = hsic_cka(k, l_dep).item(), hsic_cka(k, l_ind).item()
    assert ind < 0.12
    assert dep > 0.3
    # nHSIC (CCA), with an eps that keeps the small-eigenvalue noise from dominating
    dep, ind = hsic_cca(k, l_dep, 1e-3).item(), hsic_cca(k, l_ind, 1e-3).item()
    assert dep > 1.5 * ind


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cka_in_unit_interval_and_one_for_identical(seed):
    x, y = pair(40, seed)
    k, l = gaussian_kernel(x, 1.0), gaussian_kernel(y, 1.0)
    noise = gaussian_kernel(randn(40, 3, seed=seed + 50), 1.0)
    for a, b in [(k, l), (k, noise), (l, noise)]:
        v = hsic_cka(a, b).item()
        assert 0.0 <= v <= 1.0
    close(hsic_cka(k, k), torch.tensor(1.0, dtype=F64), rtol=1e-12)
    # invariant to scaling either kernel (but not to changing it)
    close(hsic_cka(3.0 * k, l), hsic_cka(k, l), rtol=1e-10)


def test_biased_hsic_nonnegative_for_kernels():
    for seed in range(3):
        x, y = pair(20, seed)
        noise = randn(20, 2, seed=seed + 60)
        for a, b in [(x, y), (x, noise), (y, y)]:
            assert hsic_biased(gaussian_kernel(a, 1.0), gaussian_kernel(b, 1.0)).item() >= 0


@pytest.mark.parametrize("eps", [1e-5, 1e-3])
def test_cca_self_dependence_counts_effective_dimensions(eps):
    m = 60
    k = gaussian_kernel(randn(m, 3, seed=20), 1.0)
    lam = torch.linalg.eigvalsh(ref_center(k)).clamp_min(0)
    expected = (lam**2 / (lam + eps * m) ** 2).sum()  # tr(R_K^2) from the spectrum of Kc
    self_dep = hsic_cca(k, k, eps)
    close(self_dep, expected, rtol=1e-6)
    assert self_dep.item() < m - 1  # Kc has rank at most m - 1 (the constant vector is in its kernel)
    independent = gaussian_kernel(randn(m, 3, seed=21), 1.0)
    assert self_dep.item() > hsic_cca(k, independent, eps).item()


def test_cca_of_labels_with_themselves_is_classes_minus_one():
    # One-hot labels of C classes: Kc has rank C - 1 with large eigenvalues, so tr(R_L^2) ~ C - 1.
    classes, m = 10, 200
    labels = torch.arange(m) % classes
    y = torch.nn.functional.one_hot(labels, classes).to(F64)
    l = gaussian_kernel(y, 1.0)
    assert hsic_cca(l, l).item() == pytest.approx(classes - 1, abs=0.05)
    x = randn(m, 4, seed=22)
    assert hsic_cca(gaussian_kernel(x, 1.0), l).item() < classes - 1


@pytest.mark.parametrize(
    ("m", "classes", "sigma", "eps"), [(40, 10, 6.0, 1e-5), (64, 3, 0.5, 1e-2), (33, 7, 50.0, 1e-5)]
)
def test_one_hot_cca_factor_is_the_labels_kernel_factor(m, classes, sigma, eps):
    # The closed form against the textbook R = Kc (Kc + eps m I)^-1 of the labels' Gaussian kernel, with a
    # class missing from the batch in one case (its column of Yc is zero).
    labels = torch.randint(0, classes - (classes == 7), (m,), generator=torch.Generator().manual_seed(m))
    y = torch.nn.functional.one_hot(labels, classes).to(F64)
    factor, failed = one_hot_cca_factor_ex(y, sigma, eps)
    close(factor, ref_r(ref_kernel(y, sigma), eps), rtol=1e-6, atol=1e-10)
    assert not bool(failed)
    as_float, _ = one_hot_cca_factor_ex(y.float(), sigma, eps)
    assert as_float.dtype == torch.float32
    close(as_float.double(), factor, rtol=0, atol=1e-6)


def test_one_hot_cca_factor_of_stacked_batches_is_each_batch_factor():
    # A group of batches' labels in one call, one with a class missing: each factor and flag its own batch's.
    g = torch.Generator().manual_seed(5)
    labels = torch.stack([torch.randint(0, 6, (24,), generator=g), torch.randint(0, 5, (24,), generator=g)])
    y = torch.nn.functional.one_hot(labels, 6).to(F64)
    factors, failed = one_hot_cca_factor_ex(y, 6.0, 1e-5)
    assert factors.shape == (2, 24, 24) and failed.shape == (2,)
    for i in range(2):
        close(factors[i], one_hot_cca_factor_ex(y[i], 6.0, 1e-5)[0], rtol=0, atol=1e-14)
    wide, wide_failed = one_hot_cca_factor_ex(y, 1e200, 1e-5)
    assert wide.shape == (2, 24, 24) and wide_failed.shape == (2,) and not wide_failed.any()


def test_one_hot_cca_factor_flags_a_system_that_is_not_positive_definite():
    y = torch.nn.functional.one_hot(torch.arange(20) % 4, 4).to(F64)
    assert bool(one_hot_cca_factor_ex(y, 1.0, eps=-1.0)[1])


@pytest.mark.parametrize("sigma", [1e10, 1e200])
def test_one_hot_cca_factor_of_a_near_constant_kernel_is_zero(sigma):
    # Bandwidths so wide that every pair's kernel rounds to 1 (Kc = 0, R = 0), the widest beyond float64's
    # range for 1 - c: zeros, not a division by zero.
    y = torch.nn.functional.one_hot(torch.arange(12) % 3, 3).to(F64)
    factor, failed = one_hot_cca_factor_ex(y, sigma, 1e-5)
    assert factor.abs().max().item() < 1e-12 and not bool(failed)


@pytest.mark.parametrize("seed", [0, 1])
def test_center_rows_and_columns_sum_to_zero_and_idempotent(seed):
    for k in (gaussian_kernel(randn(25, 4, seed=seed), 1.0), randn(25, 25, seed=seed + 1) + 5.0):
        kc = center(k)
        assert kc.sum(dim=0).abs().max().item() < 1e-12
        assert kc.sum(dim=1).abs().max().item() < 1e-12
        close(center(kc), kc, rtol=1e-10, atol=1e-13)
    k = gaussian_kernel(randn(25, 4, seed=seed), 1.0)
    close(center(k), center(k).T, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("sigma", [None, 0.3, 1.0, 6.0])
def test_kernel_diagonal_one_values_in_unit_interval_symmetric(sigma):
    x = randn(30, 8, seed=23)
    k = gaussian_kernel(x, sigma)
    assert k.shape == (30, 30)
    assert torch.equal(k.diagonal(), torch.ones(30, dtype=F64))
    assert (k > 0).all() and (k <= 1).all()
    close(k, k.T, rtol=1e-12)
    off = k[~torch.eye(30, dtype=torch.bool)]
    assert (off < 1).all()  # distinct samples are strictly less similar than a sample to itself


def test_kernel_values_bounded_with_float32_offset_features():
    x = 1e3 + randn(15, 4, seed=24, dtype=torch.float32) * 1e-2  # 105 pairs: odd, unambiguous median
    for sigma in (None, 1.0):
        k = gaussian_kernel(x, sigma)
        assert torch.isfinite(k).all() and (k > 0).all() and (k <= 1).all()
        close(k, ref_kernel(x, sigma), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("sigma", [None, 1.0])
def test_image_shaped_inputs_match_flattened(sigma):
    x = randn(11, 3, 4, 5, seed=25)  # 55 pairs: an unambiguous median for the reference
    flat = x.reshape(11, -1)
    assert torch.equal(gaussian_kernel(x, sigma), gaussian_kernel(flat, sigma))
    assert torch.equal(squared_distances(x), squared_distances(flat))
    assert median_sigma(x) == median_sigma(flat)
    close(gaussian_kernel(x, sigma), ref_kernel(flat, sigma))


# --- 3. gradients against finite differences -------------------------------------------------------------


GRAD_M, GRAD_D = 8, 4


def _grad_inputs(seed: int = 26):
    z = randn(GRAD_M, GRAD_D, seed=seed).requires_grad_()
    _, y = pair(GRAD_M, seed + 1, dx=GRAD_D, dy=3)
    x = randn(GRAD_M, 2, 3, seed=seed + 2)
    return z, gaussian_kernel(y, 1.0), gaussian_kernel(x, 1.0)


@pytest.mark.parametrize("sigma", [None, 0.8])
def test_stacked_kernels_are_each_batch_kernel_with_its_gradient(sigma):
    # One kernel per batch of a stack [n, m, ...] (a group's factors in one call): values, and gradients, equal
    # the batches' own; the median bandwidth is each batch's, not the stack's.
    x = torch.stack([randn(9, 2, 3, seed=40), 5.0 * randn(9, 2, 3, seed=41)]).requires_grad_()
    weights = randn(2, 9, 9, seed=42)
    stacked = gaussian_kernel(x, sigma, stacked=True)
    assert stacked.shape == (2, 9, 9)
    (stacked * weights).sum().backward()
    for i in range(2):
        alone = x[i].detach().clone().requires_grad_()
        kernel = gaussian_kernel(alone, sigma)
        (kernel * weights[i]).sum().backward()
        close(stacked[i], kernel, rtol=1e-12)
        close(x.grad[i], alone.grad, rtol=1e-10, atol=1e-14)
    if sigma is not None:  # the median bandwidth is a constant to the backward, not to finite differences
        assert torch.autograd.gradcheck(
            lambda t: gaussian_kernel(t, sigma, stacked=True), (x.detach().requires_grad_(),)
        )


def test_gradcheck_squared_distances_and_kernel():
    z, _, _ = _grad_inputs()
    assert torch.autograd.gradcheck(squared_distances, (z,))
    assert torch.autograd.gradcheck(lambda t: gaussian_kernel(t, 1.0), (z,))
    z4 = randn(GRAD_M, 2, 1, 2, seed=27).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: gaussian_kernel(t, 0.7), (z4,))


GRAD_FNS = {
    "biased": lambda kz, ky, kx: hsic_biased(kz, ky) - hsic_biased(kz, kx),
    "cka": lambda kz, ky, kx: hsic_cka(kz, ky) + 0.5 * hsic_cka(kx, kz),
    "cca": lambda kz, ky, kx: hsic_cca(kz, ky, 1e-2) - hsic_cca(kx, kz, 1e-2),
    "cca_self": lambda kz, ky, kx: hsic_cca(kz, kz, 1e-2),
    "plausible": lambda kz, ky, kx: plausible_loss(kz, ky, 2.0),
}


@pytest.mark.parametrize("name", list(GRAD_FNS))
def test_gradcheck_estimators(name):
    z, ky, kx = _grad_inputs()
    fn = GRAD_FNS[name]
    assert torch.autograd.gradcheck(lambda t: fn(gaussian_kernel(t, 1.0), ky, kx), (z,))


@pytest.mark.parametrize("name", ESTIMATORS)
def test_gradcheck_estimator_objects_with_precomputed_factors(name):
    z, ky, kx = _grad_inputs(seed=30)
    est = make_estimator(name, eps=1e-2)
    fy, fx = est.factor(ky), est.factor(kx)  # batch-only factors, computed once

    def loss(t):
        fz = est.factor(gaussian_kernel(t, 1.0))
        other = est.dependence(fz, fz) if est.self_input else est.dependence(fz, fx)
        return other - 2.0 * est.dependence(fz, fy)

    assert torch.autograd.gradcheck(loss, (z,))


def test_gradcheck_cca_factor_matrix():
    k = gaussian_kernel(randn(6, 3, seed=31), 1.0).detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda t: cca_factor(0.5 * (t + t.T), 1e-2), (k,))


def test_median_sigma_kernel_gradient_treats_bandwidth_as_constant():
    # sigma=None detaches the heuristic bandwidth: gradients equal those of the same fixed bandwidth.
    z, ky, _ = _grad_inputs(seed=32)
    s = median_sigma(z)
    (g_none,) = torch.autograd.grad(hsic_biased(gaussian_kernel(z, None), ky), z)
    (g_fixed,) = torch.autograd.grad(hsic_biased(gaussian_kernel(z, s / math.sqrt(GRAD_D)), ky), z)
    close(g_none, g_fixed, rtol=1e-10, atol=1e-14)
    assert g_none.abs().max() > 0


# --- 4. dtypes and devices -------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtypes_and_devices_agree(device, dtype):
    x64, y64 = pair(48, 33)
    x, y = x64.to(device=device, dtype=dtype), y64.to(device=device, dtype=dtype)
    rtol = 1e-3 if dtype == torch.float32 else 1e-9
    for sigma in (None, 1.0):
        k, l = gaussian_kernel(x, sigma), gaussian_kernel(y, sigma)
        k64, l64 = gaussian_kernel(x64, sigma), gaussian_kernel(y64, sigma)
        assert k.dtype == dtype and k.device.type == device
        close(k, k64, rtol=rtol, atol=1e-6 if dtype == torch.float32 else 0.0)
        for fn in (hsic_biased, hsic_cka, hsic_cca, plausible_loss):
            v = fn(k, l)
            assert v.dtype == dtype and v.device.type == device and v.dim() == 0
            assert torch.isfinite(v)
            close(v, fn(k64, l64), rtol=rtol)
        for name in ESTIMATORS:
            est = make_estimator(name)
            v = est.dependence(est.factor(k), est.factor(l))
            assert v.dtype == dtype and v.device.type == device
            close(
                v,
                make_estimator(name).dependence(make_estimator(name).factor(k64), make_estimator(name).factor(l64)),
                rtol=rtol,
            )


@pytest.mark.parametrize("device", DEVICES)
def test_backward_runs_on_device_in_float32(device):
    z = randn(16, 5, seed=34, dtype=torch.float32).to(device).requires_grad_()
    ky = gaussian_kernel(randn(16, 3, seed=35, dtype=torch.float32).to(device), 1.0)
    for fn in (hsic_biased, hsic_cka, hsic_cca, plausible_loss):
        (g,) = torch.autograd.grad(fn(gaussian_kernel(z, 1.0), ky), z)
        assert g.dtype == torch.float32 and g.device.type == device
        assert torch.isfinite(g).all()


# --- 5. errors ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sigma", [0, 0.0, -1.0, -1e-9])
def test_nonpositive_sigma_raises(sigma):
    with pytest.raises(ValueError, match="sigma"):
        gaussian_kernel(randn(5, 2, seed=36), sigma)


@pytest.mark.parametrize("name", ["nope", "CCA", "", "hsic"])
def test_unknown_estimator_raises_listing_valid_names(name):
    with pytest.raises(ValueError) as info:
        make_estimator(name)
    message = str(info.value)
    assert repr(name) in message
    for valid in ESTIMATORS:
        assert valid in message


@pytest.mark.parametrize("eps", [-0.1, -1.0])
def test_cca_non_positive_definite_system_raises(eps):
    k = gaussian_kernel(randn(10, 3, seed=37), 1.0)
    for call in (
        lambda: cca_factor(k, eps),
        lambda: hsic_cca(k, k, eps),
        lambda: make_estimator("cca", eps=eps).factor(k),
    ):
        with pytest.raises(FloatingPointError, match="not positive definite") as info:
            call()
        assert "eps" in str(info.value) and "float64" in str(info.value)


def test_cca_factor_ex_flags_a_failed_solve_without_raising_and_otherwise_equals_cca_factor():
    k = gaussian_kernel(randn(10, 3, seed=37), 1.0)
    factor, failed = cca_factor_ex(k, 1e-3)
    assert failed.dtype == torch.bool and not bool(failed)
    torch.testing.assert_close(factor, cca_factor(k, 1e-3), rtol=0, atol=0)
    batch = torch.stack([k, k])
    batch[1].diagonal().sub_(5.0)  # not positive definite
    _, failed = cca_factor_ex(batch, 1e-3)
    assert failed.tolist() == [False, True]
    assert make_estimator("cca").factor_ex is not None and make_estimator("cka").factor_ex is None

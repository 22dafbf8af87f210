"""The matching solver against every one-to-one matching of small matrices."""

import itertools

import numpy as np
import pytest

from hsic_ray.assignment import max_weight_matching


def best_total(weights: np.ndarray) -> float:
    rows, columns = weights.shape
    return max(weights[np.arange(rows), list(cols)].sum() for cols in itertools.permutations(range(columns), rows))


@pytest.mark.parametrize("seed", range(40))
def test_matches_the_best_of_every_matching(seed):
    rng = np.random.default_rng(seed)
    rows = int(rng.integers(1, 6))
    weights = rng.normal(size=(rows, int(rng.integers(rows, 8))))
    if seed % 2:
        weights = np.round(weights)  # ties: several matchings share the best total
    columns = max_weight_matching(weights)
    assert len(set(columns.tolist())) == rows
    assert weights[np.arange(rows), columns].sum() == pytest.approx(best_total(weights), abs=1e-9)


def test_not_the_greedy_choice():
    # Row 0 alone would take column 0, but the best total gives it to row 1.
    weights = np.array([[5.0, 4.0], [10.0, 1.0]])
    np.testing.assert_array_equal(max_weight_matching(weights), [1, 0])


def test_many_classes_quickly():
    weights = np.random.default_rng(0).normal(size=(100, 512))
    columns = max_weight_matching(weights)
    assert len(set(columns.tolist())) == 100
    # Each row takes one of its own largest weights: a random 100 x 512 matrix leaves room for all of them.
    assert weights[np.arange(100), columns].mean() > np.sort(weights, axis=1)[:, -8].mean()


@pytest.mark.parametrize(
    "weights, message",
    [(np.zeros((3, 2)), "rows <= columns"), (np.array([[np.nan, 1.0]]), "finite")],
)
def test_bad_input(weights, message):
    with pytest.raises(ValueError, match=message):
        max_weight_matching(weights)

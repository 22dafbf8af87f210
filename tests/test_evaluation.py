import numpy as np
import pytest
import torch

from hsic_ray.evaluation import (
    accuracy,
    assignment_accuracy,
    class_means,
    greedy_assignment,
    hungarian_assignment,
    least_squares_accuracy,
    unformatted_accuracy,
)


def _noisy_onehot(labels, class_to_unit, units, noise, rng):
    out = np.zeros((len(labels), units))
    out[np.arange(len(labels)), class_to_unit[labels]] = 1.0
    return out + noise * rng.standard_normal(out.shape)


def _labels(n, num_classes, rng):
    lab = rng.integers(0, num_classes, size=n)
    lab[:num_classes] = np.arange(num_classes)  # every class present
    return lab


# ---------------------------------------------------------------- class_means


def test_class_means_values_and_shape():
    out = np.array([[1.0, 0.0, 2.0], [3.0, 0.0, 0.0], [0.0, 5.0, 1.0]])
    lab = np.array([0, 0, 1])
    means = class_means(out, lab, 2)
    assert means.shape == (2, 3)
    np.testing.assert_allclose(means, [[2.0, 0.0, 1.0], [0.0, 5.0, 1.0]])


def test_class_means_accepts_torch():
    out = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    lab = torch.tensor([1, 0])
    np.testing.assert_allclose(class_means(out, lab, 2), [[0.0, 1.0], [1.0, 0.0]])


def test_class_means_missing_class_raises():
    out = np.eye(3)
    with pytest.raises(ValueError, match=r"class\(es\) \[1\]"):
        class_means(out, np.array([0, 2, 2]), 3)


def test_class_means_label_out_of_range_raises():
    with pytest.raises(ValueError, match="num_classes"):
        class_means(np.eye(3), np.array([0, 1, 3]), 3)


# ---------------------------------------------------------------- assignments


@pytest.mark.parametrize("method", ["hungarian", "greedy"])
def test_recovers_known_permutation(method):
    rng = np.random.default_rng(0)
    num_classes = 10
    perm = rng.permutation(num_classes)
    train_lab = _labels(500, num_classes, rng)
    test_lab = _labels(300, num_classes, rng)
    train = _noisy_onehot(train_lab, perm, num_classes, 0.1, rng)
    test = _noisy_onehot(test_lab, perm, num_classes, 0.1, rng)
    assign = hungarian_assignment if method == "hungarian" else greedy_assignment
    np.testing.assert_array_equal(assign(train, train_lab, num_classes), perm)
    acc = unformatted_accuracy(train, train_lab, test, test_lab, num_classes, method=method)
    assert acc >= 99.0


def test_rectangular_units_more_than_classes():
    rng = np.random.default_rng(1)
    num_classes, units = 4, 9
    class_to_unit = np.array([7, 2, 5, 0])
    train_lab = _labels(200, num_classes, rng)
    test_lab = _labels(100, num_classes, rng)
    train = _noisy_onehot(train_lab, class_to_unit, units, 0.05, rng)
    test = _noisy_onehot(test_lab, class_to_unit, units, 0.05, rng)
    h = hungarian_assignment(train, train_lab, num_classes)
    g = greedy_assignment(train, train_lab, num_classes)
    assert h.shape == (num_classes,) and h.dtype.kind == "i"
    np.testing.assert_array_equal(h, class_to_unit)
    np.testing.assert_array_equal(g, class_to_unit)
    assert len(set(h.tolist())) == num_classes
    assert unformatted_accuracy(train, train_lab, test, test_lab, num_classes) == pytest.approx(100.0)


def _greedy_trap():
    # Class means: class 0 -> [0.9, 0.8], class 1 -> [0.85, 0.1].
    # Greedy: class 0 takes unit 0 (0.9), class 1 is left with unit 1 (weight 1.0 in total).
    # Hungarian: 0 -> 1, 1 -> 0 (weight 1.65), which is also what the sample argmaxes say.
    out = np.array(
        [
            [1.8, 0.7],  # class 0, argmax 0
            [0.0, 0.9],  # class 0, argmax 1
            [0.85, 0.1],  # class 1, argmax 0
            [0.85, 0.1],  # class 1, argmax 0
            [0.85, 0.1],  # class 1, argmax 0
        ]
    )
    lab = np.array([0, 0, 1, 1, 1])
    return out, lab


def test_greedy_worse_than_hungarian():
    out, lab = _greedy_trap()
    np.testing.assert_allclose(class_means(out, lab, 2), [[0.9, 0.8], [0.85, 0.1]])
    g = greedy_assignment(out, lab, 2)
    h = hungarian_assignment(out, lab, 2)
    np.testing.assert_array_equal(g, [0, 1])
    np.testing.assert_array_equal(h, [1, 0])
    acc_g = unformatted_accuracy(out, lab, out, lab, 2, method="greedy")
    acc_h = unformatted_accuracy(out, lab, out, lab, 2, method="hungarian")
    assert acc_g == pytest.approx(20.0)  # only the first class-0 sample
    assert acc_h == pytest.approx(80.0)  # all but the first class-0 sample
    assert acc_h > acc_g


def test_greedy_class_order_matters():
    # Both classes prefer unit 0; class 0 comes first, so it gets it even though class 1 likes it more.
    means_like = np.array([[0.6, 0.5, 0.0], [0.9, 0.0, 0.4]])
    lab = np.array([0, 1])
    np.testing.assert_array_equal(greedy_assignment(means_like, lab, 2), [0, 2])
    np.testing.assert_array_equal(hungarian_assignment(means_like, lab, 2), [1, 0])


# ---------------------------------------------------------------- accuracies


def test_unassigned_unit_argmax_counts_as_wrong():
    # 2 classes on 3 units; unit 2 belongs to no class.
    out = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    lab = np.array([0, 1, 0, 1])
    assert assignment_accuracy(out, lab, np.array([0, 1])) == pytest.approx(50.0)
    # With a third class assigned to unit 2, the last sample (label 1) is still wrong.
    assert assignment_accuracy(out, lab, np.array([0, 1, 2])) == pytest.approx(50.0)


def test_assignment_accuracy_balanced():
    out = np.array([[1.0, 0.0]] * 3 + [[1.0, 0.0]])
    lab = np.array([0, 0, 0, 1])
    assert assignment_accuracy(out, lab, np.array([0, 1])) == pytest.approx(75.0)
    assert assignment_accuracy(out, lab, np.array([0, 1]), balanced=True) == pytest.approx(50.0)


def test_accuracy_range_and_values():
    rng = np.random.default_rng(2)
    for _ in range(5):
        out = rng.standard_normal((50, 10))
        lab = rng.integers(0, 10, size=50)
        for value in (
            accuracy(out, lab),
            assignment_accuracy(out, lab, rng.permutation(10)),
            unformatted_accuracy(out, np.arange(50) % 10, out, lab, 10, method="greedy"),
        ):
            assert isinstance(value, float)
            assert 0.0 <= value <= 100.0
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [5.0, 1.0], [0.0, 1.0]])
    assert accuracy(logits, torch.tensor([0, 1, 1, 1])) == pytest.approx(75.0)
    assert accuracy(logits, np.array([0, 1, 0, 1])) == pytest.approx(100.0)
    assert accuracy(logits, np.array([1, 0, 1, 0])) == pytest.approx(0.0)


def test_accepts_torch_tensors_everywhere():
    rng = np.random.default_rng(3)
    lab = _labels(60, 3, rng)
    out = _noisy_onehot(lab, np.array([2, 0, 1]), 3, 0.05, rng)
    t_out, t_lab = torch.tensor(out, dtype=torch.float32), torch.tensor(lab)
    assert unformatted_accuracy(t_out, t_lab, t_out, t_lab, 3) == pytest.approx(100.0)
    np.testing.assert_array_equal(hungarian_assignment(t_out, t_lab, 3), [2, 0, 1])


# ---------------------------------------------------------------- errors


def test_too_narrow_last_layer_raises():
    out = np.random.default_rng(4).standard_normal((20, 3))
    lab = np.arange(20) % 3
    with pytest.raises(ValueError, match="at least num_classes wide"):
        unformatted_accuracy(out, lab, out, lab, 5)
    lab4 = np.arange(20) % 4
    with pytest.raises(ValueError, match="at least num_classes wide"):
        hungarian_assignment(np.zeros((20, 3)), lab4, 4)
    with pytest.raises(ValueError, match="at least num_classes wide"):
        greedy_assignment(np.zeros((20, 3)), lab4, 4)


def test_unknown_method_raises():
    out, lab = _greedy_trap()
    with pytest.raises(ValueError, match="unknown method"):
        unformatted_accuracy(out, lab, out, lab, 2, method="kmeans")


def test_missing_class_in_train_raises():
    out = np.eye(3)
    with pytest.raises(ValueError, match="no samples"):
        unformatted_accuracy(out, np.array([0, 0, 2]), out, np.array([0, 1, 2]), 3)


@pytest.mark.parametrize(
    "outputs, labels",
    [
        (np.zeros(5), np.zeros(5, dtype=int)),  # 1-D outputs
        (np.zeros((5, 2, 2)), np.zeros(5, dtype=int)),  # 3-D outputs
        (np.zeros((5, 2)), np.zeros(4, dtype=int)),  # length mismatch
        (np.zeros((5, 2)), np.zeros((5, 1), dtype=int)),  # 2-D labels
        (np.zeros((0, 2)), np.zeros(0, dtype=int)),  # no samples
        (np.full((2, 2), np.nan), np.array([0, 1])),  # non-finite
        (np.zeros((2, 2)), np.array([0.5, 1.0])),  # non-integer labels
        (np.zeros((2, 2)), np.array([-1, 1])),  # negative label
    ],
)
def test_bad_shapes_raise(outputs, labels):
    with pytest.raises(ValueError):
        accuracy(outputs, labels)
    with pytest.raises(ValueError):
        class_means(outputs, labels, 2)


def test_test_outputs_width_mismatch_raises():
    out, lab = _greedy_trap()
    with pytest.raises(ValueError, match="units"):
        unformatted_accuracy(out, lab, np.zeros((5, 3)), lab, 2)
    with pytest.raises(ValueError, match="test_labels"):
        unformatted_accuracy(out, lab, out, lab[:4], 2)


def test_bad_class_to_unit_raises():
    out, lab = _greedy_trap()
    with pytest.raises(ValueError, match="distinct"):
        assignment_accuracy(out, lab, np.array([0, 0]))
    with pytest.raises(ValueError, match="outside"):
        assignment_accuracy(out, lab, np.array([0, 2]))
    with pytest.raises(ValueError, match="num_classes"):
        assignment_accuracy(out, lab, np.array([0]))  # label 1 has no unit


def test_least_squares_readout_reads_linearly_coded_classes_and_not_noise():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 3000)
    # Classes coded along random directions in 32 dimensions, plus noise: a linear readout separates them,
    # though no single unit matches a class (the unformatted readout could not).
    features = np.eye(10)[labels] @ rng.normal(size=(10, 32)) + 0.3 * rng.normal(size=(3000, 32))
    assert least_squares_accuracy(features[:2000], labels[:2000], features[2000:], labels[2000:], 10) > 95
    noise = rng.normal(size=(3000, 32))
    assert least_squares_accuracy(noise[:2000], labels[:2000], noise[2000:], labels[2000:], 10) < 20


def test_the_epoch_readout_fits_on_a_fixed_training_subset_and_scores_the_whole_test_split(digits):
    from hsic_ray.network_evaluation import NetworkEvaluation

    projection = torch.randn(784, 32, generator=torch.Generator().manual_seed(0))
    seen = []

    def forward_chunks(chunks):  # a network's output: the pixels through a fixed random projection
        for x in chunks:
            seen.append(len(x))
            yield x.flatten(1) @ projection

    subset = NetworkEvaluation(digits, forward_chunks, readout_samples=500, seed=7)
    first = subset.epoch_accuracies()
    assert sum(seen) == 500 + len(digits.y_test)
    assert subset.epoch_accuracies() == first  # the same subset every epoch
    seen.clear()
    full = NetworkEvaluation(digits, forward_chunks, readout_samples=None).epoch_accuracies()
    assert sum(seen) == len(digits.y_train) + len(digits.y_test)
    # A subset at least the split's size is the split: the readouts are those of every training sample.
    assert NetworkEvaluation(digits, forward_chunks, readout_samples=len(digits.y_train)).epoch_accuracies() == full
    assert full["test_accuracy_least_squares"] > 60
    assert abs(first["test_accuracy_least_squares"] - full["test_accuracy_least_squares"]) < 10

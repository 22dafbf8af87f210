"""Reading accuracy off a network's outputs: plain argmax, the "unformatted" readout, and a least-squares one.

An unformatted network ends in a layer of `units >= num_classes` outputs with no trained head. To read a
class off it, each class is matched to one output unit using the class-mean output vectors of a fitting
set (the training data), and a sample counts as correct when its argmax unit is the unit matched to its
label. Two matchings are offered:

* ``"hungarian"``: the maximum-weight one-to-one assignment of classes to units on the class-mean matrix
  (the sound version);
* ``"greedy"``: the HSIC-bottleneck authors' rule: for each class in order 0..C-1, take the largest entry
  of its mean vector among the units not yet taken by an earlier class.

A sample whose argmax unit is matched to no class is wrong. Accuracies are percentages in [0, 100]. By
default they are over samples; ``balanced=True`` gives the mean of the per-class accuracies instead, which
is how the authors' code scores unformatted accuracy.

The assignments are pure numpy (torch tensors are accepted and converted, detached, moved to CPU).
The least-squares classifier (`RidgeClassifier`: one-hot ridge regression in closed form; the least-squares
readout of the network's output, which stands in for the format head between epochs, and the linear probe of
every layer) is torch on the CPU: float32 products of each chunk, summed and solved in float64.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch

from hsic_ray.assignment import max_weight_matching

METHODS = ("hungarian", "greedy")


def _to_numpy(x: Any) -> np.ndarray:
    """A numpy view of `x`: torch tensors are detached and moved to CPU; anything else goes via asarray."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype in (torch.bfloat16, torch.float16):
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def _outputs(outputs: Any, name: str = "outputs") -> np.ndarray:
    out = _to_numpy(outputs)
    if out.ndim != 2:
        raise ValueError(f"{name} must be 2-D [samples, units]; got shape {tuple(out.shape)}")
    if out.shape[0] == 0:
        raise ValueError(f"{name} has no samples")
    if out.shape[1] == 0:
        raise ValueError(f"{name} has no units")
    if not np.issubdtype(out.dtype, np.number) or np.issubdtype(out.dtype, np.complexfloating):
        raise ValueError(f"{name} must be real numbers; got dtype {out.dtype}")
    if not np.all(np.isfinite(out)):
        raise ValueError(f"{name} contains non-finite values (NaN or inf)")
    return out.astype(np.float64, copy=False)


def _labels(labels: Any, n: int, name: str = "labels") -> np.ndarray:
    lab = _to_numpy(labels)
    if lab.ndim != 1:
        raise ValueError(f"{name} must be 1-D [samples]; got shape {tuple(lab.shape)}")
    if lab.shape[0] != n:
        raise ValueError(f"{name} has {lab.shape[0]} entries but the outputs have {n} samples")
    if np.issubdtype(lab.dtype, np.bool_) or not np.issubdtype(lab.dtype, np.number):
        raise ValueError(f"{name} must be integer class indices; got dtype {lab.dtype}")
    if not np.issubdtype(lab.dtype, np.integer):
        if not np.all(np.isfinite(lab)) or np.any(lab != np.round(lab)):
            raise ValueError(f"{name} must be integer class indices")
    lab = lab.astype(np.int64)
    if lab.size and lab.min() < 0:
        raise ValueError(f"{name} must be non-negative class indices; got {int(lab.min())}")
    return lab


def _check_num_classes(num_classes: int) -> int:
    if isinstance(num_classes, bool) or int(num_classes) != num_classes or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer; got {num_classes!r}")
    return int(num_classes)


def _check_labels_in_range(lab: np.ndarray, num_classes: int, name: str = "labels") -> None:
    if lab.size and lab.max() >= num_classes:
        raise ValueError(f"{name} contain class {int(lab.max())} but num_classes is {num_classes}")


def _check_width(units: int, num_classes: int) -> None:
    if units < num_classes:
        raise ValueError(
            f"the last layer must be at least num_classes wide to read an unformatted output: it has "
            f"{units} units but there are {num_classes} classes"
        )


def class_means(outputs: Any, labels: Any, num_classes: int) -> np.ndarray:
    """The mean output vector of each class: an array [num_classes, units].

    Raises ValueError when a class in 0..num_classes-1 has no sample (its mean is undefined).
    """
    num_classes = _check_num_classes(num_classes)
    out = _outputs(outputs)
    lab = _labels(labels, out.shape[0])
    _check_labels_in_range(lab, num_classes)
    counts = np.bincount(lab, minlength=num_classes)
    missing = np.flatnonzero(counts == 0)
    if missing.size:
        raise ValueError(
            f"class(es) {missing.tolist()} have no samples in labels; every class 0..{num_classes - 1} "
            "needs at least one to compute its mean output"
        )
    sums = np.zeros((num_classes, out.shape[1]), dtype=np.float64)
    np.add.at(sums, lab, out)
    return sums / counts[:, None]


def hungarian_assignment(outputs: Any, labels: Any, num_classes: int) -> np.ndarray:
    """class_to_unit [num_classes]: the maximum-weight one-to-one matching of classes to units on the
    class-mean matrix."""
    means = class_means(outputs, labels, num_classes)
    _check_width(means.shape[1], means.shape[0])
    return max_weight_matching(means)


def greedy_assignment(outputs: Any, labels: Any, num_classes: int) -> np.ndarray:
    """class_to_unit [num_classes] by the authors' rule: for each class c in order 0..C-1, the unit with
    the largest entry of c's mean output vector among the units not yet taken by an earlier class (ties go
    to the lowest unit index)."""
    means = class_means(outputs, labels, num_classes)
    _check_width(means.shape[1], means.shape[0])
    taken = np.zeros(means.shape[1], dtype=bool)
    class_to_unit = np.empty(means.shape[0], dtype=np.int64)
    for c in range(means.shape[0]):
        row = np.where(taken, -np.inf, means[c])
        unit = int(np.argmax(row))
        class_to_unit[c] = unit
        taken[unit] = True
    return class_to_unit


def _percent_correct(correct: np.ndarray, lab: np.ndarray, balanced: bool) -> float:
    if not balanced:
        return float(100.0 * correct.mean())
    classes = np.unique(lab)
    per_class = [correct[lab == c].mean() for c in classes]
    return float(100.0 * np.mean(per_class))


def assignment_accuracy(outputs: Any, labels: Any, class_to_unit: Any, *, balanced: bool = False) -> float:
    """Percentage of samples whose argmax unit is ``class_to_unit[label]``.

    A sample whose argmax unit is assigned to no class is wrong. With ``balanced=True`` the result is the
    mean over the classes present in `labels` of the per-class accuracies.
    """
    out = _outputs(outputs)
    lab = _labels(labels, out.shape[0])
    mapping = _to_numpy(class_to_unit)
    if mapping.ndim != 1 or mapping.shape[0] == 0:
        raise ValueError(f"class_to_unit must be a non-empty 1-D array; got shape {tuple(mapping.shape)}")
    if not np.issubdtype(mapping.dtype, np.integer):
        raise ValueError(f"class_to_unit must hold integer unit indices; got dtype {mapping.dtype}")
    mapping = mapping.astype(np.int64)
    units = out.shape[1]
    if mapping.min() < 0 or mapping.max() >= units:
        raise ValueError(f"class_to_unit holds unit indices outside 0..{units - 1}: {mapping.tolist()}")
    if np.unique(mapping).size != mapping.size:
        raise ValueError(f"class_to_unit must map classes to distinct units; got {mapping.tolist()}")
    _check_labels_in_range(lab, mapping.shape[0])
    correct = np.argmax(out, axis=1) == mapping[lab]
    return _percent_correct(correct, lab, balanced)


def unformatted_accuracy(
    train_outputs: Any,
    train_labels: Any,
    test_outputs: Any,
    test_labels: Any,
    num_classes: int,
    method: str = "hungarian",
    *,
    balanced: bool = False,
) -> float:
    """Test accuracy (%) of an unformatted network: the class-to-unit matching is fitted on the training
    outputs by `method` ("hungarian" or "greedy") and scored on the test outputs."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    num_classes = _check_num_classes(num_classes)
    train = _outputs(train_outputs, "train_outputs")
    test = _outputs(test_outputs, "test_outputs")
    _check_width(train.shape[1], num_classes)
    if test.shape[1] != train.shape[1]:
        raise ValueError(f"train_outputs have {train.shape[1]} units but test_outputs have {test.shape[1]}")
    test_lab = _labels(test_labels, test.shape[0], "test_labels")
    _check_labels_in_range(test_lab, num_classes, "test_labels")
    assign = hungarian_assignment if method == "hungarian" else greedy_assignment
    class_to_unit = assign(train, train_labels, num_classes)
    return assignment_accuracy(test, test_lab, class_to_unit, balanced=balanced)


def accuracy(logits: Any, labels: Any) -> float:
    """Plain argmax accuracy in percent (for a trained format head)."""
    out = _outputs(logits, "logits")
    lab = _labels(labels, out.shape[0])
    return float(100.0 * np.mean(np.argmax(out, axis=1) == lab))


class RidgeClassifier:
    """A linear classifier fitted in closed form: ridge regression of one-hot labels on standardised
    features, with a bias. The training split arrives in chunks (`add`), of which only sums are kept (the
    features' sum, Gram matrix and products with the labels), so a split's features are never held at
    once; `fit` solves one (d + 1) x (d + 1) system; `predict` gives class scores of raw features."""

    def __init__(self, num_classes: int, ridge: float = 1e-3):
        self.num_classes, self.ridge = _check_num_classes(num_classes), ridge
        self.samples = 0
        self._shift: torch.Tensor | None = None
        self._weights: torch.Tensor | None = None

    def add(self, features: Any, labels: Any) -> None:
        x = torch.as_tensor(features).detach().cpu().flatten(1).float()
        onehot = torch.nn.functional.one_hot(torch.as_tensor(labels).long().cpu(), self.num_classes).float()
        if self._shift is None:
            # Sums about the first chunk's mean: a feature far from 0 (or constant) loses no precision when
            # its mean is taken out of the Gram matrix below.
            self._shift = x.double().mean(0)
            d, zeros = x.shape[1], functools.partial(torch.zeros, dtype=torch.float64)
            self._sum, self._gram, self._xty = zeros(d), zeros(d, d), zeros(d, self.num_classes)
            self._counts = zeros(self.num_classes)
        # A chunk's products in float32 (half float64's time on a CPU), about the shift, so that they stay
        # small; the sums across chunks in float64.
        x = x - self._shift.float()
        self.samples += len(x)
        self._sum += x.sum(0, dtype=torch.float64)
        self._gram += (x.T @ x).double()
        self._xty += (x.T @ onehot).double()
        self._counts += onehot.sum(0, dtype=torch.float64)

    def fit(self) -> RidgeClassifier:
        if self._shift is None:
            raise ValueError("the classifier needs training samples before it is fitted")
        n, d = self.samples, len(self._shift)
        mean = self._sum / n
        cov = self._gram / n - torch.outer(mean, mean)  # of the features, over n (numpy's std, ddof 0)
        scale = 1.0 / (cov.diagonal().clamp_min(0).sqrt() + 1e-8)
        # The normal equations of [standardised features, 1]: their columns are centred, so the bias
        # decouples from the weights except through the ridge, which penalises it too.
        gram = torch.zeros(d + 1, d + 1, dtype=torch.float64)
        gram[:d, :d] = n * cov * torch.outer(scale, scale)
        gram[d, d] = n
        gram += self.ridge * n * torch.eye(d + 1, dtype=torch.float64)
        rhs = torch.cat([(self._xty - torch.outer(mean, self._counts)) * scale[:, None], self._counts[None]])
        solution = torch.linalg.solve(gram, rhs)
        self._weights = solution[:d] * scale[:, None]  # on raw features: fold the standardisation in
        self._bias = solution[d] - (self._shift + mean) @ self._weights
        return self

    def predict(self, features: Any) -> torch.Tensor:
        """Class scores [samples, classes] of raw features (float64, CPU)."""
        if self._weights is None:
            raise ValueError("fit the classifier before predicting")
        return torch.as_tensor(features).detach().cpu().flatten(1).double() @ self._weights + self._bias


def least_squares_accuracy(
    train_features: Any, train_labels: Any, test_features: Any, test_labels: Any, num_classes: int, ridge: float = 1e-3
) -> float:
    """Test accuracy (%) of a `RidgeClassifier` fitted on the training features. A stand-in for the format
    head where training one costs too much (each HSIC epoch of a sweep), since both are linear maps of the
    same features."""
    x, t = _outputs(train_features, "train_features"), _outputs(test_features, "test_features")
    y = _labels(train_labels, x.shape[0], "train_labels")
    classifier = RidgeClassifier(num_classes, ridge)
    classifier.add(torch.from_numpy(x), torch.from_numpy(y))
    return accuracy(classifier.fit().predict(torch.from_numpy(t)), test_labels)

"""The network's test accuracy, read off its output three ways (hsic_ray.evaluation):

* *unformatted*: each class matched to one output unit (no trained map);
* *least squares*: a closed-form one-hot ridge regression on the output, cheap enough to fit after every
  HSIC epoch, where it stands in for the format head;
* *formatted*: the SGD-trained format head, at the end of the run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor

from hsic_ray import evaluation
from hsic_ray.data import ImageData, fixed_subset, split_chunks
from hsic_ray.head import FormatHead


class NetworkEvaluation:
    def __init__(
        self,
        data: ImageData,
        forward_chunks: Callable[[Iterable[Tensor]], Iterator[Tensor]],
        readout_samples: int | None = None,
        seed: int = 0,
    ):
        """`forward_chunks`: the whole network's eval-mode output of each chunk of images, on the CPU (a
        pipeline's). The readouts between epochs are fitted on `readout_samples` training samples, a fixed
        subset drawn with `seed` (None, or at least the split's size: all of them)."""
        self.data = data
        self.forward_chunks = forward_chunks
        self._readout_train = fixed_subset(data.x_train, data.y_train, readout_samples, np.random.default_rng(seed))

    def features(self, x: np.ndarray) -> Tensor:
        """The network's output for a whole split, flattened per sample."""
        return torch.cat(list(self.forward_chunks(split_chunks(x)))).flatten(1)

    def epoch_accuracies(self) -> dict[str, Any]:
        """Test accuracy now, unformatted and least squares: the format head trains only after the last
        epoch, so the least-squares readout stands in for it between epochs. Both are fitted on the fixed
        readout subset of the training split and scored on the whole test split: on a large split, the
        forward pass over every training image would cost a good part of an epoch's training."""
        data, (x_train, y_train) = self.data, self._readout_train
        train_features, test_features = self.features(x_train), self.features(data.x_test)
        return {
            "test_accuracy_unformatted": self._unformatted(train_features, y_train, test_features),
            "test_accuracy_least_squares": evaluation.least_squares_accuracy(
                train_features, y_train, test_features, data.y_test, data.num_classes
            ),
        }

    def final_accuracies(self, train_features: Tensor, test_features: Tensor, head: FormatHead) -> dict[str, Any]:
        """Formatted (the trained head's) train and test accuracy, and unformatted test accuracy by the sound
        and by the authors' class-to-unit assignment, from the network's output for every sample of each split."""
        data = self.data
        return {
            "test_accuracy_formatted": evaluation.accuracy(head.logits(test_features), data.y_test),
            "train_accuracy_formatted": evaluation.accuracy(head.logits(train_features), data.y_train),
            "test_accuracy_unformatted": self._unformatted(train_features, data.y_train, test_features),
            # The authors' reading, for comparison: greedy assignment, mean of per-class accuracies.
            "test_accuracy_unformatted_greedy": self._unformatted(
                train_features, data.y_train, test_features, "greedy"
            ),
        }

    def _unformatted(
        self, train_features: Tensor, train_labels: np.ndarray, test_features: Tensor, method: str = "hungarian"
    ) -> float | None:
        """None when the last layer is narrower than the class count (it cannot be read without a head)."""
        data = self.data
        if train_features.shape[1] < data.num_classes:
            return None
        return evaluation.unformatted_accuracy(
            train_features,
            train_labels,
            test_features,
            data.y_test,
            data.num_classes,
            method=method,
            balanced=method == "greedy",
        )

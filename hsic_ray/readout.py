"""Reading the trained network's output three ways: its units as classes (unformatted), a closed-form
least-squares readout, and the SGD-trained format head."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from hsic_ray import evaluation
from hsic_ray.config import ExperimentConfig
from hsic_ray.data import ImageData, split_chunks
from hsic_ray.head import FormatHead
from hsic_ray.run.metrics_log import MetricsLog

log = logging.getLogger("hsic_ray")


class Readout:
    def __init__(self, cfg: ExperimentConfig, data: ImageData, forward: Callable[[Tensor], Tensor], head: FormatHead):
        """`forward`: the whole network's eval-mode output of a batch of images, on the CPU."""
        self.cfg = cfg
        self.data = data
        self.forward = forward
        self.head = head

    def features(self, x: np.ndarray) -> Tensor:
        """The network's output for a whole split, flattened per sample."""
        return torch.cat([self.forward(chunk) for chunk in split_chunks(x)]).flatten(1)

    def without_head(self) -> dict[str, Any]:
        """Test accuracy now, unformatted and of a least-squares linear readout: the format head trains only
        after the last epoch, so the readout stands in for it between epochs."""
        data = self.data
        train_features, test_features = self.features(data.x_train), self.features(data.x_test)
        return {
            "test_accuracy_unformatted": self._unformatted(train_features, test_features),
            "test_accuracy_least_squares": evaluation.least_squares_accuracy(
                train_features, data.y_train, test_features, data.y_test, data.num_classes
            ),
        }

    def fit_head(self, train_features: Tensor, out: MetricsLog) -> list[float]:
        """Train the format head on the frozen network's training-set output; its loss per epoch."""
        labels = torch.from_numpy(self.data.y_train)
        losses = self.head.fit(train_features, labels, self.cfg.head.epochs, self.cfg.train.seed)
        for epoch, loss in enumerate(losses, 1):
            out.append({"kind": "format_epoch", "epoch": epoch, "loss": loss})
            log.info("format head epoch %d/%d  loss %.4f", epoch, len(losses), loss)
        return losses

    def accuracies(self, train_features: Tensor) -> dict[str, Any]:
        """Formatted (the head's) train and test accuracy, and unformatted test accuracy by the sound and by
        the authors' class-to-unit assignment."""
        data, head = self.data, self.head
        test_features = self.features(data.x_test)
        return {
            "test_accuracy_formatted": evaluation.accuracy(head.logits(test_features), data.y_test),
            "train_accuracy_formatted": evaluation.accuracy(head.logits(train_features), data.y_train),
            "test_accuracy_unformatted": self._unformatted(train_features, test_features),
            # The authors' reading, for comparison: greedy assignment, mean of per-class accuracies.
            "test_accuracy_unformatted_greedy": self._unformatted(train_features, test_features, "greedy"),
        }

    def _unformatted(self, train_features: Tensor, test_features: Tensor, method: str = "hungarian") -> float | None:
        """None when the last layer is narrower than the class count (it cannot be read without a head)."""
        data = self.data
        if train_features.shape[1] < data.num_classes:
            return None
        return evaluation.unformatted_accuracy(
            train_features,
            data.y_train,
            test_features,
            data.y_test,
            data.num_classes,
            method=method,
            balanced=method == "greedy",
        )

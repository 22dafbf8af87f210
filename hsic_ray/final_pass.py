"""What the end of a run reads off its trained network, in one forward pass over each split: the network's
output for every training and test image (the format head's features and the final accuracies), and every
layer's final linear probe (hsic_ray.probes).

The probes are fitted on a fixed subset of the training split (`train.final_probe_samples`) and scored on the
whole test split. Those images go through the network once, every layer's probe view read on the way: the last
layer's view is the network's output itself while the output is at most `train.probe_features` wide. The rest
of the training split goes through for its output alone. A wider output (its view reduced) keeps the probes'
passes apart from the output's (docs/design.md, "The end of a run in one pass").
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from hsic_ray.config import TrainConfig
from hsic_ray.data import ImageData, fixed_indices, split_chunks
from hsic_ray.pipeline import Pipeline
from hsic_ray.probes import LayerProbes, Split, Views, fitted_views, probe_layers, probe_record, split_views
from hsic_ray.timeline import Timeline


@dataclass
class FinalOutputs:
    train_features: Tensor  # the network's output for each training image, flattened, in the split's order
    test_features: Tensor
    probes: dict[str, Any] | None  # the final probes' record (as hsic_ray.probes.probe_layers'); None: probes off


class FinalPass:
    def __init__(
        self, train: TrainConfig, data: ImageData, pipeline: Pipeline, output_features: int, timeline: Timeline
    ):
        """`output_features`: the network's output width per sample, flattened."""
        self.data, self.pipeline, self.timeline = data, pipeline, timeline
        self.layer_outputs = functools.partial(pipeline.layer_outputs, max_features=train.probe_features)
        self.probe_indices: np.ndarray | None = None
        if train.probe_samples:
            rng = np.random.default_rng(train.seed + 2)
            self.probe_indices = fixed_indices(len(data.y_train), train.final_probe_samples, rng)
        self.shared = self.probe_indices is not None and output_features <= train.probe_features

    def read(self) -> FinalOutputs:
        """The outputs and probes of the network as it is now. Phases: the forward passes are the final
        evaluation's; what only the probes need (their fit and scoring, or their own passes) is theirs."""
        with self.timeline.phase("final_evaluation"):
            if self.shared:
                return self._read_shared()
            data = self.data
            outputs = FinalOutputs(self._features(data.x_train), self._features(data.x_test), None)
        if self.probe_indices is not None:
            with self.timeline.phase("final_probes"):
                started = time.perf_counter()
                record = probe_layers(self.layer_outputs, self._probe_train(), self._test(), data.num_classes)
                outputs.probes = {**record, "seconds": time.perf_counter() - started}
        return outputs

    def _read_shared(self) -> FinalOutputs:
        probe_train, test = self._probe_train(), self._test()
        probes, train_features = self._train_pass(probe_train)
        with self.timeline.phase("final_probes"):
            started = time.perf_counter()
            probes.fit()
            fitted = fitted_views(probes, self.layer_outputs, probe_train)
            train_accuracy = probes.accuracies(fitted, len(probe_train[1]))
            seconds = time.perf_counter() - started
        test_outputs: list[Tensor] = []
        test_views = _last_layer_kept(split_views(self.layer_outputs, test), test_outputs)
        test_accuracy = probes.accuracies(test_views, len(test[1]))
        record = {**probe_record(train_accuracy, test_accuracy, probe_train, test), "seconds": seconds}
        return FinalOutputs(train_features, torch.cat(test_outputs), record)

    def _train_pass(self, probe_train: Split) -> tuple[LayerProbes, Tensor]:
        """The probes' training subset first, every layer's view added to the probes and the last layer's kept
        as the output; then the rest of the split, for its output alone. The outputs in the split's order."""
        probes, outputs = LayerProbes(self.data.num_classes), []
        for views, y in split_views(self.layer_outputs, probe_train):
            probes.add(views, y)
            outputs.append(views[-1])
        rest = np.setdiff1d(np.arange(len(self.data.y_train)), self.probe_indices)
        outputs = torch.cat(outputs + self._outputs(self.data.x_train[rest]))
        in_split_order = torch.empty_like(outputs)
        in_split_order[torch.from_numpy(np.concatenate([self.probe_indices, rest]))] = outputs
        return probes, in_split_order

    def _probe_train(self) -> Split:
        return self.data.x_train[self.probe_indices], self.data.y_train[self.probe_indices]

    def _test(self) -> Split:
        return self.data.x_test, self.data.y_test

    def _outputs(self, x: np.ndarray) -> list[Tensor]:
        return [out.flatten(1) for out in self.pipeline.forward_chunks(split_chunks(x))]

    def _features(self, x: np.ndarray) -> Tensor:
        return torch.cat(self._outputs(x))


def _last_layer_kept(views: Iterable[Views], kept: list[Tensor]) -> Iterator[Views]:
    """`views` as they pass, each chunk's last layer appended to `kept`: the network's output."""
    for chunk in views:
        kept.append(chunk[0][-1])
        yield chunk

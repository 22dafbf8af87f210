"""Linear probes of every layer: how well a linear classifier reads the labels off each layer's output.

The format head reads only the last layer; a probe per layer shows where along the network the class
information is, and whether deep layers lose what shallow ones held. Each probe is a `RidgeClassifier`
(hsic_ray.evaluation: one-hot ridge regression in closed form on standardised features) fitted on the
training images' layer outputs and scored on the training and test images. hsic_ray.layer_monitor runs it
with the epochs' monitors (when hsic_ray.monitor_schedule has them) on fixed subsets of the splits
(`train.probe_samples`), and hsic_ray.final_pass at the end of the run on the whole test split, fitted on up to
`train.final_probe_samples` training samples.

Layers wider than MAX_PROBE_FEATURES are reduced first, on the stage that holds them (`probe_view`), so
that the fit's (d + 1) x (d + 1) system and what crosses Ray stay small: conv maps are average-pooled over
space to the largest square grid that fits (every channel kept, with a coarse spatial layout: resconv's
64 x 14 x 14 = 12,544 features become 64 x 5 x 5 = 1,600); any other output goes through a fixed Gaussian
random projection to MAX_PROBE_FEATURES, seeded by its width so that every stage and run uses the same,
which keeps distances and so linear separability about intact (Johnson-Lindenstrauss).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor

from hsic_ray.data import EVAL_CHUNK, to_tensor
from hsic_ray.evaluation import RidgeClassifier

MAX_PROBE_FEATURES = 2048

# A pipeline's `layer_outputs`: chunks of images -> for each, every layer's probe view (flattened, CPU).
LayerOutputs = Callable[[Iterable[Tensor]], Iterator[list[Tensor]]]
Split = tuple[np.ndarray, np.ndarray]  # images (as stored: uint8 pixels) and labels


def probe_view(z: Tensor, max_features: int = MAX_PROBE_FEATURES) -> Tensor:
    """A batch of one layer's outputs as its probe reads them: [samples, at most max_features]."""
    if z.dim() == 4 and z[0].numel() > max_features:
        channels, height, width = z.shape[1:]
        side = max(1, math.isqrt(max_features // channels))
        z = torch.nn.functional.adaptive_avg_pool2d(z, (min(side, height), min(side, width)))
    z = z.flatten(1)
    if z.shape[1] > max_features:
        z = z @ _projection(z.shape[1], max_features, z.device, z.dtype)
    return z


@functools.lru_cache(maxsize=8)
def _projection(width: int, features: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    generator = torch.Generator().manual_seed(width)
    return (torch.randn(width, features, generator=generator) / math.sqrt(features)).to(device, dtype)


# Training-split views kept between the fit and its scoring, so that only what does not fit goes through the
# network a second time (the forward pass, not the fit, is most of a probe's cost: resconv's on a CPU).
KEEP_BYTES = 256 * 2**20

Views = tuple[list[Tensor], Tensor]  # every layer's probe view of a chunk of images, and their labels


class LayerProbes:
    """Every layer's classifier, fitted from probe views that arrive a chunk at a time. The classifiers keep
    only sums; the first chunks' views are also kept, up to KEEP_BYTES, to score the fit on its own samples
    without a second pass."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.classifiers: list[RidgeClassifier] = []
        self.kept: list[Views] = []  # a prefix of the chunks added, so that the rest resume in order
        self._kept_bytes, self._keeping = 0, True

    @property
    def kept_samples(self) -> int:
        return sum(len(y) for _, y in self.kept)

    def add(self, views: list[Tensor], y: Tensor) -> None:
        self.classifiers = self.classifiers or [RidgeClassifier(self.num_classes) for _ in views]
        for classifier, features in zip(self.classifiers, views):
            classifier.add(features, y)
        self._kept_bytes += sum(features.numel() * features.element_size() for features in views)
        self._keeping = self._keeping and self._kept_bytes <= KEEP_BYTES
        if self._keeping:
            self.kept.append((views, y))

    def fit(self) -> None:
        for classifier in self.classifiers:
            classifier.fit()

    def accuracies(self, views: Iterable[Views], samples: int) -> list[float]:
        """Per layer, the percentage of `samples` (arriving as `views`) each fitted probe classifies right."""
        correct = torch.zeros(len(self.classifiers), dtype=torch.int64)
        for outputs, y in views:
            for i, (classifier, features) in enumerate(zip(self.classifiers, outputs)):
                correct[i] += int((classifier.predict(features).argmax(1) == y).sum())
        return (100.0 * correct.double() / samples).tolist()


def probe_layers(
    layer_outputs: LayerOutputs,
    train: Split,
    test: Split,
    num_classes: int,
    chunk: int = EVAL_CHUNK,
) -> dict[str, Any]:
    """Every layer's probe fitted on `train` (images, labels) and scored on both splits: train_accuracy
    and test_accuracy per layer (%), and the sample counts. The images go through the network `chunk` at a
    time; training views beyond what `LayerProbes` keeps go through a second time to be scored."""
    probes = LayerProbes(num_classes)
    for views, y in split_views(layer_outputs, train, chunk):
        probes.add(views, y)
    probes.fit()
    return probe_record(
        probes.accuracies(fitted_views(probes, layer_outputs, train, chunk), len(train[1])),
        probes.accuracies(split_views(layer_outputs, test, chunk), len(test[1])),
        train,
        test,
    )


def probe_record(train_accuracy: list[float], test_accuracy: list[float], train: Split, test: Split) -> dict[str, Any]:
    """What a round of probes reports: each layer's accuracy (%) on the split it was fitted on and on the test
    split, and the two splits' sample counts."""
    return {
        "train_accuracy": train_accuracy,
        "test_accuracy": test_accuracy,
        "train_samples": len(train[1]),
        "test_samples": len(test[1]),
    }


def split_views(layer_outputs: LayerOutputs, split: Split, chunk: int = EVAL_CHUNK, start: int = 0) -> Iterator[Views]:
    """Every layer's probe view of `split`'s images from sample `start` on, `chunk` at a time, with their labels."""
    x, y = split
    starts = range(start, len(y), chunk)
    outputs = layer_outputs(to_tensor(x[i : i + chunk]) for i in starts)
    for i, views in zip(starts, outputs):
        yield views, torch.as_tensor(y[i : i + chunk]).long()


def fitted_views(
    probes: LayerProbes, layer_outputs: LayerOutputs, train: Split, chunk: int = EVAL_CHUNK
) -> Iterator[Views]:
    """The views of the split `probes` were fitted on: those it kept, then the rest through the network again."""
    return itertools.chain(probes.kept, split_views(layer_outputs, train, chunk, start=probes.kept_samples))

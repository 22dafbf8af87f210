"""Linear probes of every layer: how well a linear classifier reads the labels off each layer's output.

The format head reads only the last layer; a probe per layer shows where along the network the class
information is, and whether deep layers lose what shallow ones held. Each probe is a `RidgeClassifier`
(hsic_ray.evaluation: one-hot ridge regression in closed form on standardised features) fitted on the
training images' layer outputs and scored on the training and test images. hsic_ray.layer_monitor runs it
after every HSIC epoch on fixed subsets of the splits (`train.probe_samples`), and at the end of the run
(hsic_ray.run_end) on the whole test split, fitted on up to `train.final_probe_samples` training samples.

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


def _views(layer_outputs: LayerOutputs, split: Split, chunk: int, start: int = 0) -> Iterator[Views]:
    x, y = split
    starts = range(start, len(y), chunk)
    outputs = layer_outputs(to_tensor(x[i : i + chunk]) for i in starts)
    for i, views in zip(starts, outputs):
        yield views, torch.as_tensor(y[i : i + chunk]).long()


def probe_layers(
    layer_outputs: LayerOutputs,
    train: Split,
    test: Split,
    num_classes: int,
    chunk: int = EVAL_CHUNK,
) -> dict[str, Any]:
    """Every layer's probe fitted on `train` (images, labels) and scored on both splits: train_accuracy
    and test_accuracy per layer (%), and the sample counts. The classifiers keep only sums, so the images go
    through the network `chunk` at a time; the training views are kept for scoring up to KEEP_BYTES, and
    the rest go through a second time."""
    classifiers: list[RidgeClassifier] = []
    kept: list[Views] = []
    kept_bytes, keeping = 0, True
    for outputs, y in _views(layer_outputs, train, chunk):
        classifiers = classifiers or [RidgeClassifier(num_classes) for _ in outputs]
        for classifier, features in zip(classifiers, outputs):
            classifier.add(features, y)
        kept_bytes += sum(features.numel() * features.element_size() for features in outputs)
        keeping = keeping and kept_bytes <= KEEP_BYTES  # a prefix of the chunks, so the rest resume in order
        if keeping:
            kept.append((outputs, y))
    for classifier in classifiers:
        classifier.fit()
    train_views = itertools.chain(kept, _views(layer_outputs, train, chunk, start=len(kept) * chunk))
    return {
        "train_accuracy": _accuracies(classifiers, train_views, len(train[1])),
        "test_accuracy": _accuracies(classifiers, _views(layer_outputs, test, chunk), len(test[1])),
        "train_samples": len(train[1]),
        "test_samples": len(test[1]),
    }


def _accuracies(classifiers: list[RidgeClassifier], views: Iterable[Views], samples: int) -> list[float]:
    correct = torch.zeros(len(classifiers), dtype=torch.int64)
    for outputs, y in views:
        for i, (classifier, features) in enumerate(zip(classifiers, outputs)):
            correct[i] += int((classifier.predict(features).argmax(1) == y).sum())
    return (100.0 * correct.double() / samples).tolist()

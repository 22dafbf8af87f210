"""Image arrays of a train/test split: the container, and the validation every source ends in.

`check_arrays` validates everything before any training starts and normalises the layout: images uint8
(or float32 in [0, 1]) as C-contiguous [N, C, H, W], labels int64.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from hsic_ray.errors import DataError


@dataclass(frozen=True, eq=False)  # eq=False: comparing arrays element-wise has no single truth value
class ImageData:
    name: str
    x_train: np.ndarray  # uint8 [N, C, H, W], or float32 in [0, 1] with the same layout
    y_train: np.ndarray  # int64 [N]
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        c, h, w = self.x_train.shape[1:]
        return int(c), int(h), int(w)


def _check_images(name: str, split: str, x: Any) -> np.ndarray:
    where = f"dataset {name!r}: x_{split}"
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.ndim not in (3, 4):
        raise DataError(
            f"{where} has shape {x.shape} ({x.ndim}-D): expected 3-D [N, H, W] or 4-D images "
            "[N, C, H, W] / [N, H, W, C] with C in 1, 3, 4"
        )
    if x.shape[0] == 0:
        raise DataError(f"{where} is empty: every split needs at least one image")
    if x.dtype == np.uint8:
        pass
    elif np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32, copy=False)
        if not np.isfinite(x).all():
            bad = int(np.size(x) - np.count_nonzero(np.isfinite(x)))
            raise DataError(f"{where} holds {bad} NaN/inf values: expected finite floats in [0, 1]")
        lo, hi = float(x.min()), float(x.max())
        if lo < 0.0 or hi > 1.0:
            raise DataError(
                f"{where} has float values in [{lo:g}, {hi:g}]: expected floats in [0, 1] "
                "(divide 0-255 pixels by 255, or store them as uint8)"
            )
    else:
        raise DataError(f"{where} has unsupported dtype {x.dtype}: expected uint8 pixels (0-255) or floats in [0, 1]")
    if x.ndim == 3:
        x = x[:, None, :, :]
    elif x.shape[1] not in (1, 3, 4):
        if x.shape[3] in (1, 3, 4):
            x = x.transpose(0, 3, 1, 2)  # channels last -> channels first
        else:
            raise DataError(
                f"{where} has shape {x.shape}: a 4-D image array needs 1, 3 or 4 channels, "
                "on axis 1 [N, C, H, W] or axis 3 [N, H, W, C]"
            )
    return np.ascontiguousarray(x)


def _check_labels(name: str, split: str, y: Any, count: int) -> np.ndarray:
    where = f"dataset {name!r}: y_{split}"
    if isinstance(y, torch.Tensor):
        y = y.detach().cpu().numpy()
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise DataError(f"{where} has shape {y.shape}: expected one integer class label per image, shape [N]")
    if y.dtype.kind not in "iu":
        raise DataError(
            f"{where} has dtype {y.dtype}: labels must be integers (class indices 0..K-1), "
            "not one-hot vectors, floats or strings; convert them with y.astype(np.int64)"
        )
    if y.shape[0] != count:
        raise DataError(
            f"dataset {name!r}: x_{split} has {count} images but y_{split} has {y.shape[0]} labels: expected "
            "one label per image"
        )
    return np.ascontiguousarray(y, dtype=np.int64)


def check_arrays(
    name: str,
    x_train: Any,
    y_train: Any,
    x_test: Any,
    y_test: Any,
    num_classes: int | None = None,
) -> ImageData:
    """Validate a train/test split and normalise its layout.

    Images become C-contiguous [N, C, H, W]: 3-D [N, H, W] gains a channel axis, and 4-D channels-last
    [N, H, W, C] is transposed (an array whose axis 1 is 1, 3 or 4 long is taken as channels-first).
    uint8 stays uint8; floats (which must be finite and in [0, 1]) become float32. Labels become int64
    in [0, num_classes); num_classes defaults to max label + 1 over both splits.
    Raises DataError naming the split, what is wrong and what is expected.
    """
    xs = {split: _check_images(name, split, x) for split, x in (("train", x_train), ("test", x_test))}
    ys = {
        split: _check_labels(name, split, y, xs[split].shape[0]) for split, y in (("train", y_train), ("test", y_test))
    }
    if xs["train"].shape[1:] != xs["test"].shape[1:]:
        raise DataError(
            f"dataset {name!r}: train images are {xs['train'].shape[1:]} (C, H, W) but test images are "
            f"{xs['test'].shape[1:]}: both splits need the same image shape"
        )
    if xs["train"].dtype != xs["test"].dtype:
        raise DataError(
            f"dataset {name!r}: train images are {xs['train'].dtype} but test images are {xs['test'].dtype}: "
            "store both splits as uint8 or both as floats in [0, 1]"
        )
    top = max(int(ys["train"].max()), int(ys["test"].max()))
    inferred = num_classes is None
    if inferred:
        num_classes = top + 1
    elif isinstance(num_classes, bool) or int(num_classes) != num_classes or num_classes < 1:
        raise DataError(f"dataset {name!r}: num_classes={num_classes!r} is invalid: expected an integer >= 1")
    num_classes = int(num_classes)
    for split, y in ys.items():
        lo, hi = int(y.min()), int(y.max())
        if lo < 0:
            raise DataError(
                f"dataset {name!r}: y_{split} has negative label {lo}: expected class indices in [0, {num_classes})"
            )
        if hi >= num_classes:
            raise DataError(
                f"dataset {name!r}: y_{split} has label {hi} but num_classes is {num_classes}: expected class "
                f"indices in [0, {num_classes}) (labels must be 0-based)"
            )
    _check_classes(name, ys["train"], ys["test"], num_classes, inferred)
    return ImageData(
        name=name,
        x_train=xs["train"],
        y_train=ys["train"],
        x_test=xs["test"],
        y_test=ys["test"],
        num_classes=num_classes,
    )


def _check_classes(name: str, y_train: np.ndarray, y_test: np.ndarray, num_classes: int, inferred: bool) -> None:
    """At least two classes, none seen only in testing (it could never be predicted), and, where the class
    count comes from the largest label, no gaps (sparse labels 0, 1000, ... would make empty classes)."""
    present = np.unique(y_train)
    if len(present) < 2:
        raise DataError(
            f"dataset {name!r}: y_train holds only class {present[0]}: a classifier needs at least 2 classes"
        )
    unseen = np.setdiff1d(np.unique(y_test), present)
    if len(unseen):
        raise DataError(
            f"dataset {name!r}: y_test has classes that y_train never shows ({', '.join(map(str, unseen[:5]))}); "
            "every test class needs training samples"
        )
    if inferred and len(present) < num_classes:
        raise DataError(
            f"dataset {name!r}: labels run up to {num_classes - 1} but y_train has only {len(present)} distinct "
            "classes; "
            "labels must be class indices 0..K-1 without gaps (renumber them with np.unique(y, return_inverse=True))"
        )

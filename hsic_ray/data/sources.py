"""Data sources (`DataConfig.source`) turned into validated arrays: the bundled digits, torchvision
datasets, npz files and parquet shards."""

from __future__ import annotations

import importlib.resources
import os
from pathlib import Path

import numpy as np
import torch

from hsic_ray.config import DATASET_NAMES, DataConfig
from hsic_ray.data.arrays import DataError, ImageData, check_arrays
from hsic_ray.data.parquet import read_parquet

_NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
_TORCHVISION_CLASSES = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST", "cifar10": "CIFAR10"}
_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_CIFAR10_FILES = (
    "data_batch_1",
    "data_batch_2",
    "data_batch_3",
    "data_batch_4",
    "data_batch_5",
    "test_batch",
    "batches.meta",
)


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, test indices): each class keeps its share in both, chosen by a seeded draw.

    The test split has round(N * test_fraction) samples; per class that is its exact share rounded by
    largest remainder. Both index arrays come back in a seeded random order (not sorted by class).
    """
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"test_fraction={test_fraction!r} is invalid: expected a fraction in (0, 1), e.g. 0.2")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    target = int(round(len(labels) * test_fraction))
    exact = counts * test_fraction
    per_class = np.floor(exact).astype(np.int64)
    short = target - int(per_class.sum())
    if short > 0:  # hand the rest to the classes with the largest remainders (ties: lowest class first)
        order = np.argsort(-(exact - per_class), kind="stable")
        per_class[order[:short]] += 1
    train_parts, test_parts = [], []
    for cls, k in zip(classes, per_class):
        members = rng.permutation(np.flatnonzero(labels == cls))
        test_parts.append(members[:k])
        train_parts.append(members[k:])
    train = rng.permutation(np.concatenate(train_parts))
    test = rng.permutation(np.concatenate(test_parts))
    return train, test


def _load_mnist_sample(cfg: DataConfig) -> ImageData:
    resource = importlib.resources.files("hsic_ray") / "assets" / "mnist-10k.npz"
    try:
        with resource.open("rb") as fh, np.load(fh) as archive:
            images, labels = archive["images"], archive["labels"]
    except (FileNotFoundError, KeyError) as exc:
        raise DataError(
            f"the bundled digits hsic_ray/assets/mnist-10k.npz are missing or damaged ({exc}): "
            "reinstall the package (pip install -e .) so the asset ships with it"
        ) from None
    train, test = stratified_split(labels, cfg.test_fraction, cfg.split_seed)
    return check_arrays("mnist-sample", images[train], labels[train], images[test], labels[test], num_classes=10)


def _torchvision_help(source: str, root: str) -> str:
    if source == "cifar10":
        folder = os.path.join(root, "cifar-10-batches-py")
        what = f"the unpacked CIFAR-10 python batches ({', '.join(_CIFAR10_FILES)})"
    else:
        folder = os.path.join(root, _TORCHVISION_CLASSES[source], "raw")
        what = f"the four gunzipped idx files ({', '.join(_MNIST_FILES)})"
    return (
        f"place {what} in {folder}/ and set data.download=false, or let torchvision download them "
        f"(data.download=true), which needs network access; offline, data.source=mnist-sample is bundled"
    )


def _load_torchvision(cfg: DataConfig) -> ImageData:
    source = cfg.source
    root = os.path.expanduser(cfg.root)
    try:
        import torchvision.datasets as tvd

        cls = getattr(tvd, _TORCHVISION_CLASSES[source])
        splits = [cls(root=root, train=train, download=cfg.download) for train in (True, False)]
    except Exception as exc:  # torchvision raises RuntimeError, URLError, OSError, ... for missing data
        detail = " ".join(str(exc).split())[:300]
        what = "could not be downloaded" if cfg.download else "is not on disk (data.download=false)"
        raise DataError(
            f"dataset {source!r} {what} under {root!r} ({type(exc).__name__}: {detail}); "
            + _torchvision_help(source, root)
        ) from None
    arrays = []
    for split in splits:
        x = split.data.numpy() if isinstance(split.data, torch.Tensor) else np.asarray(split.data)
        if source == "cifar10":
            x = x.transpose(0, 3, 1, 2)  # N x 32 x 32 x 3 -> N x 3 x 32 x 32
        y = split.targets.numpy() if isinstance(split.targets, torch.Tensor) else np.asarray(split.targets)
        arrays += [x, y]
    return check_arrays(source, *arrays, num_classes=10)


def _load_npz(path: str) -> ImageData:
    file = Path(os.path.expanduser(path))
    if not file.is_file():
        raise DataError(
            f"npz file {str(file)!r} does not exist: data.source=npz:PATH needs an existing .npz file "
            f"holding arrays {', '.join(_NPZ_KEYS)}"
        )
    try:
        with np.load(file, allow_pickle=False) as archive:
            found = sorted(archive.files)
            missing = [key for key in _NPZ_KEYS if key not in found]
            if missing:
                raise DataError(
                    f"npz file {str(file)!r} lacks {', '.join(missing)}: it needs arrays {', '.join(_NPZ_KEYS)}, "
                    f"found {', '.join(found) or 'none'}"
                )
            arrays = [archive[key] for key in _NPZ_KEYS]
    except DataError:
        raise
    except Exception as exc:
        raise DataError(
            f"npz file {str(file)!r} could not be read ({type(exc).__name__}: {exc}): expected a NumPy .npz "
            f"archive (np.savez) of numeric arrays {', '.join(_NPZ_KEYS)}"
        ) from None
    return check_arrays(file.stem, *arrays)


def load_dataset(source: DataConfig | str) -> ImageData:
    """The train/test arrays a source names (`DataConfig.source`, or a whole `DataConfig` such as a run's
    `config.yaml` holds), validated by `check_arrays`."""
    cfg = DataConfig(source=source) if isinstance(source, str) else source
    source = cfg.source
    if source == "mnist-sample":
        return _load_mnist_sample(cfg)
    if source in _TORCHVISION_CLASSES:
        return _load_torchvision(cfg)
    if source.startswith("npz:") and len(source) > 4:
        return _load_npz(source[4:])
    if source.startswith("parquet:") and len(source) > 8:
        return read_parquet(source[8:])
    raise DataError(
        f"data.source={source!r} is unknown: expected one of {', '.join(DATASET_NAMES)}, npz:PATH or parquet:URI"
    )

"""Data: turn a data source into validated image arrays, and those arrays into seeded batches.

Sources (`DataConfig.source`):

* ``mnist-sample``: 10,000 MNIST digits shipped in the package, split once by a fixed, seeded, stratified
  split (`DataConfig.split_seed`, `DataConfig.test_fraction`) that does not depend on the training seed.
* ``mnist``, ``fashion-mnist``, ``cifar10``: torchvision datasets under `DataConfig.root`.
* ``npz:PATH``: a NumPy archive with ``x_train, y_train, x_test, y_test``.
* ``parquet:URI``: shards written by `write_parquet` (``python -m hsic_ray.data prepare``), on any
  filesystem pyarrow can open (a local path, file://, s3://, gs://, ...).

Every source ends in `check_arrays`, which validates everything before any training starts and
normalises the layout: images uint8 (or float32 in [0, 1]) as C-contiguous [N, C, H, W], labels int64.

Batches are full batches only (drop_last: the HSIC estimate wants a constant batch size), in an order
fixed by (seed, epoch), and can resume at any batch index within an epoch.
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import os
import posixpath
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch

from hsic_ray.config import DATASET_NAMES, DataConfig
from hsic_ray.run_dir import OutputLocationError, check_location

PARQUET_FORMAT_VERSION = 1
_METADATA_KEY = b"hsic_ray"
_NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
_TORCHVISION_CLASSES = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST", "cifar10": "CIFAR10"}
_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_CIFAR10_FILES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch", "batches.meta")


class DataError(ValueError):
    """The data or its source is wrong; the message names the problem and how to fix it."""


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


@dataclass(frozen=True, eq=False)
class Batch:
    x: torch.Tensor  # float32 [B, C, H, W] in [0, 1]
    y: torch.Tensor  # int64 [B]
    epoch: int
    index: int  # batch index within the epoch


# --- validation ------------------------------------------------------------------------------------------


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
        raise DataError(
            f"{where} has unsupported dtype {x.dtype}: expected uint8 pixels (0-255) or floats in [0, 1]"
        )
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
        raise DataError(f"dataset {name!r}: x_{split} has {count} images but y_{split} has {y.shape[0]} labels: expected one label per image")
    return np.ascontiguousarray(y, dtype=np.int64)


def check_arrays(
    name: str,
    x_train: Any,
    y_train: Any,
    x_test: Any,
    y_test: Any,
    num_classes: Optional[int] = None,
) -> ImageData:
    """Validate a train/test split and normalise its layout.

    Images become C-contiguous [N, C, H, W]: 3-D [N, H, W] gains a channel axis, and 4-D channels-last
    [N, H, W, C] is transposed (an array whose axis 1 is 1, 3 or 4 long is taken as channels-first).
    uint8 stays uint8; floats (which must be finite and in [0, 1]) become float32. Labels become int64
    in [0, num_classes); num_classes defaults to max label + 1 over both splits.
    Raises DataError naming the split, what is wrong and what is expected.
    """
    xs = {split: _check_images(name, split, x) for split, x in (("train", x_train), ("test", x_test))}
    ys = {split: _check_labels(name, split, y, xs[split].shape[0]) for split, y in (("train", y_train), ("test", y_test))}
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
            raise DataError(f"dataset {name!r}: y_{split} has negative label {lo}: expected class indices in [0, {num_classes})")
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
        raise DataError(f"dataset {name!r}: y_train holds only class {present[0]}: a classifier needs at least 2 classes")
    unseen = np.setdiff1d(np.unique(y_test), present)
    if len(unseen):
        raise DataError(
            f"dataset {name!r}: y_test has classes that y_train never shows ({', '.join(map(str, unseen[:5]))}); "
            "every test class needs training samples"
        )
    if inferred and len(present) < num_classes:
        raise DataError(
            f"dataset {name!r}: labels run up to {num_classes - 1} but y_train has only {len(present)} distinct classes; "
            "labels must be class indices 0..K-1 without gaps (renumber them with np.unique(y, return_inverse=True))"
        )


# --- sources ---------------------------------------------------------------------------------------------


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
        raise DataError(f"dataset {source!r} {what} under {root!r} ({type(exc).__name__}: {detail}); "
                        + _torchvision_help(source, root)) from None
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


def _filesystem(uri: str):
    """(pyarrow filesystem, path) for a local path or any URI pyarrow knows."""
    from pyarrow import fs as pafs

    if "://" not in uri:
        uri = os.path.abspath(os.path.expanduser(uri))  # from_uri refuses relative paths
    try:
        filesystem, path = pafs.FileSystem.from_uri(uri)
    except Exception as exc:
        raise DataError(
            f"cannot open {uri!r} ({type(exc).__name__}: {exc}): expected a local path or a filesystem URI "
            "pyarrow supports (file://, s3://, gs://, hdfs://...)"
        ) from None
    return filesystem, path.rstrip("/") or "/"


def _images_to_binary(x: np.ndarray):
    import pyarrow as pa

    n = x.shape[0]
    item = x[0].nbytes
    flat = np.ascontiguousarray(x).reshape(-1).view(np.uint8)
    if flat.nbytes < 2**31:
        offsets = np.arange(n + 1, dtype=np.int32) * np.int32(item)
        kind = pa.binary()
    else:
        offsets = np.arange(n + 1, dtype=np.int64) * item
        kind = pa.large_binary()
    return pa.Array.from_buffers(kind, n, [None, pa.py_buffer(offsets), pa.py_buffer(flat)])


def _binary_to_images(column, shape: tuple[int, ...], dtype: np.dtype, where: str) -> np.ndarray:
    import pyarrow as pa

    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    n = len(column)
    item = int(np.prod(shape)) * dtype.itemsize
    if n == 0:
        return np.zeros((0, *shape), dtype=dtype)
    if column.null_count:
        raise DataError(f"{where}: {column.null_count} images are null: rewrite the shards with write_parquet")
    offset_type = np.int64 if pa.types.is_large_binary(column.type) else np.int32
    _, offsets_buf, data_buf = column.buffers()
    offsets = np.frombuffer(offsets_buf, dtype=offset_type)[column.offset : column.offset + n + 1]
    if not (np.diff(offsets) == item).all():
        raise DataError(
            f"{where}: image byte lengths do not match the stored shape {shape} {dtype} ({item} bytes each): "
            "the shards are damaged or not written by hsic_ray; rewrite them with python -m hsic_ray.data prepare"
        )
    data = np.frombuffer(data_buf, dtype=np.uint8)[int(offsets[0]) : int(offsets[0]) + n * item]
    return data.view(dtype).reshape(n, *shape)


def _parquet_metadata(data: ImageData, split: str, rows: int, shards: int) -> dict[bytes, bytes]:
    info = {
        "format_version": PARQUET_FORMAT_VERSION,
        "name": data.name,
        "split": split,
        "shape": list(data.input_shape),
        "dtype": str(data.x_train.dtype),
        "num_classes": data.num_classes,
        "num_rows": rows,
        "num_shards": shards,
    }
    return {_METADATA_KEY: json.dumps(info).encode()}


def write_parquet(data: ImageData, uri: str, shard_size: int = 5000) -> None:
    """Write `data` as parquet shards: URI/train/part-00000.parquet ..., URI/test/...

    Columns: `image` (binary, the raw bytes of one C x H x W uint8/float32 image) and `label` (int64).
    The schema metadata (key "hsic_ray", JSON) holds name, split, shape, dtype, num_classes and row and
    shard counts. Shards left in URI/train or URI/test by an earlier write are replaced.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    from pyarrow import fs as pafs

    if isinstance(shard_size, bool) or int(shard_size) != shard_size or shard_size < 1:
        raise DataError(f"shard_size={shard_size!r} is invalid: expected an integer >= 1 (images per file)")
    shard_size = int(shard_size)
    data = check_arrays(data.name, data.x_train, data.y_train, data.x_test, data.y_test, data.num_classes)
    filesystem, root = _filesystem(uri)
    for split, x, y in (("train", data.x_train, data.y_train), ("test", data.x_test, data.y_test)):
        directory = posixpath.join(root, split)
        filesystem.create_dir(directory, recursive=True)
        for info in filesystem.get_file_info(pafs.FileSelector(directory)):
            if info.type == pafs.FileType.File and info.base_name.endswith(".parquet"):
                filesystem.delete_file(info.path)
        shards = max(1, -(-len(x) // shard_size))
        schema = pa.schema(
            [("image", pa.binary()), ("label", pa.int64())],
            metadata=_parquet_metadata(data, split, len(x), shards),
        )
        for shard in range(shards):
            part = slice(shard * shard_size, (shard + 1) * shard_size)
            images = _images_to_binary(x[part])
            if images.type != pa.binary():
                schema = schema.set(0, pa.field("image", images.type))
            table = pa.Table.from_arrays([images, pa.array(y[part], type=pa.int64())], schema=schema)
            pq.write_table(table, posixpath.join(directory, f"part-{shard:05d}.parquet"), filesystem=filesystem)


def _prepare_hint(uri: str) -> str:
    return f"write it first with: python -m hsic_ray.data prepare --source SOURCE --output {uri} (SOURCE: {', '.join(DATASET_NAMES)} or npz:PATH)"


def _read_parquet_split(filesystem, root: str, uri: str, split: str) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    import pyarrow.parquet as pq
    from pyarrow import fs as pafs

    directory = posixpath.join(root, split)
    where = f"parquet dataset {uri!r} ({split} split)"
    if filesystem.get_file_info(directory).type != pafs.FileType.Directory:
        raise DataError(f"parquet dataset {uri!r} has no {split}/ directory of shards; " + _prepare_hint(uri))
    files = sorted(
        info.path
        for info in filesystem.get_file_info(pafs.FileSelector(directory))
        if info.type == pafs.FileType.File and info.base_name.endswith(".parquet")
    )
    if not files:
        raise DataError(f"{where}: {directory} holds no .parquet shards; " + _prepare_hint(uri))
    images, labels, meta = [], [], None
    for path in files:
        try:
            table = pq.read_table(path, filesystem=filesystem)
        except Exception as exc:
            raise DataError(f"{where}: cannot read shard {path} ({type(exc).__name__}: {exc}); rewrite the dataset") from None
        raw = (table.schema.metadata or {}).get(_METADATA_KEY)
        if raw is None or not {"image", "label"} <= set(table.column_names):
            raise DataError(
                f"{where}: shard {path} is not an hsic_ray shard (needs columns image, label and "
                f"'hsic_ray' schema metadata; found columns {', '.join(table.column_names)}); " + _prepare_hint(uri)
            )
        info = json.loads(raw)
        if meta is None:
            meta = info
        elif any(info.get(k) != meta.get(k) for k in ("shape", "dtype", "num_classes", "name", "num_rows")):
            raise DataError(f"{where}: shard {path} was written for another dataset than {files[0]}; rewrite the dataset")
        images.append(_binary_to_images(table.column("image"), tuple(meta["shape"]), np.dtype(meta["dtype"]), where))
        labels.append(table.column("label").to_numpy())
    x, y = np.concatenate(images), np.concatenate(labels)
    if meta.get("num_rows") is not None and len(x) != meta["num_rows"]:
        raise DataError(
            f"{where}: found {len(x)} images in {len(files)} shards but {meta['num_rows']} were written "
            f"in {meta.get('num_shards')} shards: a shard is missing or extra; rewrite the dataset"
        )
    return x, y, meta


def read_parquet(uri: str) -> ImageData:
    """Read shards written by `write_parquet` back into the same arrays."""
    filesystem, root = _filesystem(uri)
    from pyarrow import fs as pafs

    try:
        found = filesystem.get_file_info(root).type
    except Exception as exc:
        raise DataError(f"cannot reach parquet dataset {uri!r} ({type(exc).__name__}: {exc}); check the URI and credentials") from None
    if found != pafs.FileType.Directory:
        raise DataError(f"parquet dataset {uri!r} does not exist; " + _prepare_hint(uri))
    x_train, y_train, meta = _read_parquet_split(filesystem, root, uri, "train")
    x_test, y_test, test_meta = _read_parquet_split(filesystem, root, uri, "test")
    num_classes = max(int(meta["num_classes"]), int(test_meta["num_classes"]))
    return check_arrays(meta.get("name") or uri, x_train, y_train, x_test, y_test, num_classes=num_classes)


def load_dataset(cfg: DataConfig) -> ImageData:
    """The train/test arrays `cfg.source` names, validated by `check_arrays`."""
    source = cfg.source
    if source == "mnist-sample":
        return _load_mnist_sample(cfg)
    if source in _TORCHVISION_CLASSES:
        return _load_torchvision(cfg)
    if source.startswith("npz:") and len(source) > 4:
        return _load_npz(source[4:])
    if source.startswith("parquet:") and len(source) > 8:
        return read_parquet(source[8:])
    raise DataError(f"data.source={source!r} is unknown: expected one of {', '.join(DATASET_NAMES)}, npz:PATH or parquet:URI")


# --- batches ---------------------------------------------------------------------------------------------


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The sample order of one epoch: a permutation of range(n) fixed by (seed, epoch) alone."""
    if n < 0 or epoch < 0:
        raise ValueError(f"epoch_permutation needs n >= 0 and epoch >= 0, got n={n}, epoch={epoch}")
    # SeedSequence takes non-negative entropy only: fold a negative seed into the unsigned 64-bit range.
    return np.random.default_rng([int(seed) % 2**64, int(epoch)]).permutation(n)


def num_batches(n: int, batch_size: int) -> int:
    """Full batches in n samples (the last partial batch is dropped: HSIC wants a constant batch size)."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} is invalid: expected an integer >= 1")
    return max(0, n) // batch_size


def to_tensor(x: np.ndarray) -> torch.Tensor:
    """uint8 pixels -> float32 / 255 (ToTensor semantics, no normalisation); floats -> float32."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.dtype == np.uint8:
        return torch.from_numpy(x.astype(np.float32)).div_(255.0)
    if np.issubdtype(x.dtype, np.floating):
        arr = np.ascontiguousarray(x, dtype=np.float32)
        if not arr.flags.writeable:
            arr = arr.copy()
        return torch.from_numpy(arr)
    raise DataError(f"to_tensor got images of dtype {x.dtype}: expected uint8 pixels or floats in [0, 1]")


EVAL_CHUNK = 1024  # samples per forward pass when a whole split is read


def split_chunks(x: np.ndarray, size: int = EVAL_CHUNK) -> Iterator[torch.Tensor]:
    """A whole split as input tensors of at most `size` samples each, in order (for evaluation)."""
    for i in range(0, len(x), size):
        yield to_tensor(x[i : i + size])


def iterate_batches(
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int,
    seed: int,
    epoch: int,
    start: int = 0,
    shuffle: bool = True,
) -> Iterator[Batch]:
    """Full batches of one epoch in the order of `epoch_permutation(len(x), seed, epoch)`.

    Starts at batch index `start` (resuming mid-epoch yields exactly the batches not yet seen); the last
    partial batch is dropped. With shuffle=False the order is the array order.
    """
    n = len(x)
    if len(y) != n:
        raise DataError(f"iterate_batches got {n} images but {len(y)} labels: expected one label per image")
    total = num_batches(n, batch_size)
    if total == 0:
        raise DataError(
            f"{n} samples make no full batch of batch_size={batch_size}: lower train.batch_size to at most {n}"
        )
    if not 0 <= start <= total:
        raise ValueError(f"start={start} is invalid: an epoch of {n} samples has batches 0..{total - 1} (start <= {total})")
    order = epoch_permutation(n, seed, epoch) if shuffle else np.arange(n)
    for index in range(start, total):
        rows = order[index * batch_size : (index + 1) * batch_size]
        yield Batch(
            x=to_tensor(x[rows]),
            y=torch.from_numpy(np.asarray(y[rows], dtype=np.int64)),
            epoch=epoch,
            index=index,
        )


# --- command line ----------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    defaults = DataConfig()
    parser = argparse.ArgumentParser(prog="python -m hsic_ray.data", description="Prepare datasets for hsic_ray.")
    commands = parser.add_subparsers(dest="command", required=True)
    prepare = commands.add_parser("prepare", help="load a source, validate it and write it as parquet shards")
    prepare.add_argument("--source", required=True, help=f"{', '.join(DATASET_NAMES)}, npz:PATH or parquet:URI")
    prepare.add_argument("--output", required=True, help="directory or URI (s3://..., gs://...) to write shards to")
    prepare.add_argument("--root", default=defaults.root, help="where torchvision datasets live (default: %(default)s)")
    prepare.add_argument("--shard-size", type=int, default=5000, help="images per parquet file (default: %(default)s)")
    prepare.add_argument("--no-download", action="store_true", help="do not download torchvision datasets")
    prepare.add_argument("--test-fraction", type=float, default=defaults.test_fraction, help="mnist-sample test share")
    prepare.add_argument("--split-seed", type=int, default=defaults.split_seed, help="mnist-sample split seed")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`python -m hsic_ray.data prepare --source SOURCE --output URI [--root DIR] [--shard-size N]`."""
    args = _parser().parse_args(argv)
    cfg = DataConfig(
        source=args.source,
        root=args.root,
        download=not args.no_download,
        test_fraction=args.test_fraction,
        split_seed=args.split_seed,
    )
    try:
        check_location(args.output)
        data = load_dataset(cfg)
        write_parquet(data, args.output, shard_size=args.shard_size)
    except (DataError, OutputLocationError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    c, h, w = data.input_shape
    print(
        f"wrote {data.name}: {len(data.x_train)} train + {len(data.x_test)} test images "
        f"({c}x{h}x{w} {data.x_train.dtype}, {data.num_classes} classes) to {args.output}; "
        f"train with data.source=parquet:{args.output}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

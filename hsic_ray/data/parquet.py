"""A dataset as parquet shards on any filesystem pyarrow opens: URI/train/part-00000.parquet ...,
URI/test/..., written once (`python -m hsic_ray.data prepare`) and read by every run."""

from __future__ import annotations

import contextlib
import json
import posixpath
from typing import Any

import numpy as np

from hsic_ray.config import DATASET_NAMES
from hsic_ray.data.arrays import DataError, ImageData, check_arrays
from hsic_ray.run.directory import storage_faults
from hsic_ray.run.location import open_location

PARQUET_FORMAT_VERSION = 1
_METADATA_KEY = b"hsic_ray"


def _filesystem(uri: str):
    """(pyarrow filesystem, path, what is there) for a local path or any URI pyarrow knows, after a first
    request that gives up within seconds (`hsic_ray.run.location.open_location`)."""
    filesystem, path, info = open_location(uri, "parquet dataset", DataError)
    return filesystem, path.rstrip("/") or "/", info


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
    shard counts. Shards left in URI/train or URI/test by an earlier write are replaced. A full or read-only
    disk raises StorageError after removing every shard this call wrote, so no partial dataset is left.
    """
    if isinstance(shard_size, bool) or int(shard_size) != shard_size or shard_size < 1:
        raise DataError(f"shard_size={shard_size!r} is invalid: expected an integer >= 1 (images per file)")
    data = check_arrays(data.name, data.x_train, data.y_train, data.x_test, data.y_test, data.num_classes)
    filesystem, root, _ = _filesystem(uri)
    written: list[str] = []

    def remove_written() -> None:
        for path in written:
            with contextlib.suppress(OSError):
                filesystem.delete_file(path)

    with storage_faults(f"parquet dataset {uri}", cleanup=remove_written):
        for split, x, y in (("train", data.x_train, data.y_train), ("test", data.x_test, data.y_test)):
            _write_split(filesystem, posixpath.join(root, split), data, split, x, y, int(shard_size), written)


def _write_split(filesystem, directory: str, data: ImageData, split: str, x, y, shard_size: int, written: list) -> None:
    """One split's shards into `directory` (its old shards removed first); each path goes on `written` before
    its file is opened, so a failed write can remove it."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from pyarrow import fs as pafs

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
        path = posixpath.join(directory, f"part-{shard:05d}.parquet")
        written.append(path)
        pq.write_table(table, path, filesystem=filesystem)


def _prepare_hint(uri: str) -> str:
    return (
        f"write it first with: python -m hsic_ray.data prepare --source SOURCE --output {uri} (SOURCE: "
        f"{', '.join(DATASET_NAMES)} or npz:PATH)"
    )


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
            raise DataError(
                f"{where}: cannot read shard {path} ({type(exc).__name__}: {exc}); rewrite the dataset"
            ) from None
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
            raise DataError(
                f"{where}: shard {path} was written for another dataset than {files[0]}; rewrite the dataset"
            )
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
    from pyarrow import fs as pafs

    filesystem, root, info = _filesystem(uri)
    if info.type != pafs.FileType.Directory:
        raise DataError(f"parquet dataset {uri!r} does not exist; " + _prepare_hint(uri))
    x_train, y_train, meta = _read_parquet_split(filesystem, root, uri, "train")
    x_test, y_test, test_meta = _read_parquet_split(filesystem, root, uri, "test")
    num_classes = max(int(meta["num_classes"]), int(test_meta["num_classes"]))
    return check_arrays(meta.get("name") or uri, x_train, y_train, x_test, y_test, num_classes=num_classes)

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

Modules: `arrays` (the container and its validation), `sources` (each source to arrays), `parquet` (shards
on any filesystem), `batches` (seeded batches), `prepare` (the command line that writes shards).
"""

from hsic_ray.data.arrays import DataError, ImageData, check_arrays
from hsic_ray.data.batches import (
    EVAL_CHUNK,
    Batch,
    epoch_permutation,
    fixed_indices,
    fixed_subset,
    iterate_batches,
    num_batches,
    split_chunks,
    to_tensor,
)
from hsic_ray.data.parquet import read_parquet, write_parquet
from hsic_ray.data.prepare import main
from hsic_ray.data.sources import load_dataset, stratified_split

__all__ = [
    "EVAL_CHUNK",
    "Batch",
    "DataError",
    "ImageData",
    "check_arrays",
    "epoch_permutation",
    "fixed_indices",
    "fixed_subset",
    "iterate_batches",
    "load_dataset",
    "main",
    "num_batches",
    "read_parquet",
    "split_chunks",
    "stratified_split",
    "to_tensor",
    "write_parquet",
]

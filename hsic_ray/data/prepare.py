"""`python -m hsic_ray.data prepare`: load a source, validate it and write it as parquet shards."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Sequence

import pyarrow.fs as pafs

from hsic_ray.config import DATASET_NAMES, DataConfig
from hsic_ray.data.arrays import ImageData
from hsic_ray.data.parquet import write_parquet
from hsic_ray.data.sources import load_dataset
from hsic_ray.errors import USER_ERRORS, OutputExistsError, StorageError
from hsic_ray.run import claim as run_claim
from hsic_ray.run.directory import RunDirectory, resolve_location

SPLITS = ("train", "test")  # what a prepared dataset's directory holds


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


def check_output(output: str) -> RunDirectory:
    """The output directory, if shards may go there: new, empty, or a dataset prepared before (whose shards
    are replaced). Anything else is refused as the jobs refuse it (`hsic_ray.run.claim`: a run, finished or
    not, or files that are not hsic-ray's), with one line, before anything is loaded or written."""
    try:
        return run_claim.claim(output, "dataset").run
    except OutputExistsError:
        run = RunDirectory(resolve_location(output))
        if set(n for n in run.list_dir() if not n.startswith(".tmp-")) <= set(SPLITS):
            return run
        raise


def _write(data: ImageData, run: RunDirectory, shard_size: int) -> None:
    """The shards; a write that fails on a full or read-only disk also removes the directories it created."""
    new_root = run.fs.get_file_info(run.root).type == pafs.FileType.NotFound
    created = [run.root] if new_root else [run.path(split) for split in SPLITS if not run.exists(split)]
    try:
        write_parquet(data, run.location, shard_size=shard_size)
    except StorageError:
        for directory in created:
            with contextlib.suppress(OSError):
                run.fs.delete_dir(directory)
        raise


def main(argv: Sequence[str] | None = None) -> int:
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
        output = check_output(args.output)
        data = load_dataset(cfg)
        _write(data, output, args.shard_size)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    c, h, w = data.input_shape
    print(
        f"wrote {data.name}: {len(data.x_train)} train + {len(data.x_test)} test images "
        f"({c}x{h}x{w} {data.x_train.dtype}, {data.num_classes} classes) to {args.output}; "
        f"train with data.source=parquet:{args.output}"
    )
    return 0

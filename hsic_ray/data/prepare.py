"""`python -m hsic_ray.data prepare`: load a source, validate it and write it as parquet shards."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from hsic_ray.config import DATASET_NAMES, DataConfig
from hsic_ray.data.arrays import DataError
from hsic_ray.data.parquet import write_parquet
from hsic_ray.data.sources import load_dataset
from hsic_ray.run.directory import OutputLocationError, check_location


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

"""The backprop baseline on Ray Train: the same network and format head, trained end to end with cross-entropy.

    python jobs/train_backprop.py                                  # deep_mlp preset on the bundled digits
    python jobs/train_backprop.py --preset paper_mlp --workers 2 --output runs/bp
    python jobs/train_backprop.py --workers 4 --use-gpu --ray-address auto

Settings apply in order: --preset, then --config FILE.yaml, then the flags below (--lr is backprop.lr).
Each epoch is checkpointed by Ray Train under DIR/ray_train/backprop (the latest two are kept); rerunning
the same command on the same --output after an interruption continues from the latest checkpoint.
Writes config.yaml, metrics.jsonl, metrics.json and grad_norms.png (per-layer gradient norms) to --output.
"""

from __future__ import annotations

import argparse
import logging
import sys

from hsic_ray.checkpoint import CheckpointError
from hsic_ray.config import ACTIVATIONS, PRESETS, ConfigError, build_config
from hsic_ray.data import DataError
from hsic_ray.distributed.placement import PlacementError
from hsic_ray.experiment import OutputExistsError
from hsic_ray.train_backprop import train_backprop

# flag -> config field; flags left unset keep the preset / file value.
FLAG_TO_FIELD = {
    "output": "output",
    "dataset": "data.source",
    "data_root": "data.root",
    "depth": "model.depth",
    "width": "model.width",
    "last_width": "model.last_width",
    "activation": "model.activation",
    "lr": "backprop.lr",
    "batch_size": "train.batch_size",
    "epochs": "train.epochs",
    "max_steps": "train.max_steps",
    "seed": "train.seed",
    "log_every": "train.log_every",
    "ray_address": "ray.address",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="deep_mlp", help="named starting config (default %(default)s)")
    p.add_argument("--config", metavar="FILE.yaml", help="YAML file of config sections applied over the preset")
    p.add_argument("--output", metavar="DIR", help="run directory (local path or pyarrow URI)")
    p.add_argument("--dataset", metavar="SOURCE", help="mnist-sample (bundled), mnist, fashion-mnist, cifar10, npz:PATH, parquet:URI")
    p.add_argument("--data-root", metavar="DIR", help="where torchvision datasets are stored / downloaded")
    p.add_argument("--depth", type=int, help="hidden width x width blocks")
    p.add_argument("--width", type=int, help="hidden width (channels for paper_resconv)")
    p.add_argument("--last-width", type=int, help="width of the network's last layer (before the format head)")
    p.add_argument("--activation", choices=ACTIVATIONS)
    p.add_argument("--lr", type=float, help="SGD learning rate of the end-to-end training (backprop.lr)")
    p.add_argument("--batch-size", type=int, help="global batch size, split over the workers")
    p.add_argument("--epochs", type=int)
    p.add_argument("--max-steps", type=int, help="stop after this many steps")
    p.add_argument("--seed", type=int)
    p.add_argument("--log-every", type=int, help="steps between progress lines")
    p.add_argument("--resume", action="store_true", help="continue the interrupted run in --output (required to exist)")
    ray = p.add_argument_group("ray train")
    ray.add_argument("--workers", type=int, default=1, help="data-parallel Ray Train workers (default %(default)s)")
    ray.add_argument("--use-gpu", action="store_true", help="one GPU per worker")
    ray.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs (and torch threads) per worker (default %(default)s)")
    ray.add_argument("--max-failures", type=int, default=0, help="worker failures Ray Train retries from the latest checkpoint")
    ray.add_argument("--ray-address", help="cluster to join (default: RAY_ADDRESS, a running local cluster, or a new one)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    overrides = {field: getattr(args, flag) for flag, field in FLAG_TO_FIELD.items()}
    try:
        cfg = build_config(args.preset, args.config, overrides)
        metrics = train_backprop(
            cfg,
            resume=args.resume,
            workers=args.workers,
            use_gpu=args.use_gpu,
            cpus_per_worker=args.cpus_per_worker,
            max_failures=args.max_failures,
        )
    except (ConfigError, DataError, OutputExistsError, CheckpointError, PlacementError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        from ray.train import TrainingFailedError

        if not isinstance(exc, TrainingFailedError):
            raise
        print(f"error: training failed ({type(exc).__name__}: {str(exc).strip().splitlines()[0]}); "
              "rerun the same command to continue from the latest checkpoint", file=sys.stderr)  # fmt: skip
        return 1
    print(f"test accuracy: formatted {metrics['test_accuracy_formatted']:.2f} after {metrics['epochs']} epochs "
          f"({metrics['steps']} steps, {metrics['samples_per_second']:.0f} samples/s)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())

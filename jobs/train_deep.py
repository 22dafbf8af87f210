"""Train a deep network with the HSIC bottleneck, layer by layer, then fit its linear format head.

    python jobs/train_deep.py                                   # deep_mlp preset on the bundled digits
    python jobs/train_deep.py --preset paper_mlp --epochs 5 --output runs/paper
    python jobs/train_deep.py --config my_run.yaml --depth 50

Settings apply in order: --preset, then --config FILE.yaml, then the flags below.
Writes config.yaml, metrics.jsonl, metrics.json and information_plane.png to --output.
"""

from __future__ import annotations

import argparse
import logging
import sys

from hsic_ray.checkpoint import CheckpointError
from hsic_ray.config import ACTIVATIONS, NULL, PRESETS, STRATEGIES, TRAINERS, ConfigError, build_config
from hsic_ray.data import DataError
from hsic_ray.distributed.connect import ClusterConnectionError
from hsic_ray.distributed.placement import PlacementError
from hsic_ray.experiment import OutputExistsError, run_hsic
from hsic_ray.hsic import ESTIMATORS

# flag -> config field; flags left unset keep the preset / file value.
FLAG_TO_FIELD = {
    "trainer": "trainer",
    "output": "output",
    "dataset": "data.source",
    "data_root": "data.root",
    "depth": "model.depth",
    "width": "model.width",
    "last_width": "model.last_width",
    "activation": "model.activation",
    "estimator": "hsic.estimator",
    "sigma": "hsic.sigma",
    "beta": "hsic.beta",
    "lr": "optim.lr",
    "batch_size": "train.batch_size",
    "epochs": "train.epochs",
    "max_steps": "train.max_steps",
    "seed": "train.seed",
    "device": "train.device",
    "log_every": "train.log_every",
    "format_epochs": "head.epochs",
    "format_lr": "head.lr",
    "concurrent_head": "head.concurrent",
    "checkpoint_every": "train.checkpoint_every",
    "ray_address": "ray.address",
    "stages": "ray.stages",
    "gpus_per_stage": "ray.gpus_per_stage",
    "cpus_per_stage": "ray.cpus_per_stage",
    "strategy": "ray.strategy",
    "max_in_flight": "ray.max_in_flight",
}


def _sigma(text: str) -> float | str:
    return NULL if text == "median" else float(text)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="deep_mlp", help="named starting config (default %(default)s)")
    p.add_argument("--config", metavar="FILE.yaml", help="YAML file of config sections applied over the preset")
    p.add_argument("--trainer", choices=TRAINERS, help="where the layers train")
    p.add_argument("--output", metavar="DIR", help="run directory (local path or pyarrow URI)")
    p.add_argument("--dataset", metavar="SOURCE", help="mnist-sample (bundled), mnist, fashion-mnist, cifar10, npz:PATH, parquet:URI")
    p.add_argument("--data-root", metavar="DIR", help="where torchvision datasets are stored / downloaded")
    p.add_argument("--depth", type=int, help="hidden width x width blocks (depth 5 = 7 HSIC-trained layers)")
    p.add_argument("--width", type=int, help="hidden width (channels for paper_resconv)")
    p.add_argument("--last-width", type=int, help="width of the last HSIC-trained layer")
    p.add_argument("--activation", choices=ACTIVATIONS)
    p.add_argument("--estimator", choices=ESTIMATORS, help="plausible: HSIC(Z,Z) replaces HSIC(Z,X); beta is its gamma (2 in the paper)")
    p.add_argument("--sigma", type=_sigma, help="kernel bandwidth (scaled by each variable's dimension), or 'median'")
    p.add_argument("--beta", type=float, help="weight of nHSIC(Z, Y) in each layer's loss")
    p.add_argument("--lr", type=float, help="SGD learning rate of the HSIC layers")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--epochs", type=int, help="HSIC training epochs")
    p.add_argument("--max-steps", type=int, help="stop HSIC training after this many steps")
    p.add_argument("--format-epochs", type=int, help="epochs of the format head on the frozen network")
    p.add_argument("--format-lr", type=float, help="SGD learning rate of the format head")
    p.add_argument("--concurrent-head", action="store_true", default=None, help="also train the head during HSIC training")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"))
    p.add_argument("--log-every", type=int, help="steps between progress lines")
    p.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (0: only at the end)")
    p.add_argument("--resume", action="store_true", help="continue the interrupted run in --output (required to exist)")
    ray = p.add_argument_group("ray trainer")
    ray.add_argument("--ray-address", help="cluster to join (default: RAY_ADDRESS, a running local cluster, or a new one)")
    ray.add_argument("--stages", type=int, help="stage actors (default: one per GPU, else one per free CPU)")
    ray.add_argument("--gpus-per-stage", type=float, help="GPUs per stage; fractions share a GPU")
    ray.add_argument("--cpus-per-stage", type=float, help="CPUs (and torch threads) per stage")
    ray.add_argument("--strategy", choices=STRATEGIES, help="placement group strategy (default PACK)")
    ray.add_argument("--max-in-flight", type=int, help="batches in the pipeline at once (default stages + 1)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    overrides = {field: getattr(args, flag) for flag, field in FLAG_TO_FIELD.items()}
    try:
        cfg = build_config(args.preset, args.config, overrides)
        metrics = run_hsic(cfg, resume=args.resume)
    except (ConfigError, DataError, OutputExistsError, CheckpointError, PlacementError, ClusterConnectionError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"test accuracy: unformatted {metrics['test_accuracy_unformatted']}, formatted {metrics['test_accuracy_formatted']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

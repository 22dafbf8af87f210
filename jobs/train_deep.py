"""Train a deep network with the HSIC bottleneck, layer by layer, then fit its linear format head.

    python jobs/train_deep.py                                   # deep_mlp preset on the bundled digits
    python jobs/train_deep.py --preset paper_mlp --epochs 5 --output runs/paper
    python jobs/train_deep.py --config my_run.yaml --depth 50

Settings apply in order: --preset, then --config FILE.yaml, then the flags below.
Writes config.yaml, metrics.jsonl, metrics.json, model.pt, information_plane.png and probes.png (each
layer's linear probe; train.probe_samples=0 turns them off) to --output (and
TensorBoard event files to --output/tensorboard with --tensorboard).
"""

from __future__ import annotations

import argparse
import logging
import sys

from hsic_ray.cli import RUN_FLAGS, JobArgumentParser, add_run_arguments, build_run_config, run_job
from hsic_ray.config import CUDA_GRAPHS, ESTIMATORS, FACTORS_ON, LR_SCHEDULES, NULL, STRATEGIES, TRAINERS
from hsic_ray.experiment import run_hsic

# train_deep's own flag -> config field (the shared ones are in hsic_ray.cli.RUN_FLAGS).
HSIC_FLAGS = {
    "trainer": "trainer",
    "estimator": "hsic.estimator",
    "sigma": "hsic.sigma",
    "beta": "hsic.beta",
    "lr": "optim.lr",
    "lr_schedule": "optim.schedule",
    "device": "train.device",
    "cuda_graphs": "train.cuda_graphs",
    "format_epochs": "head.epochs",
    "format_lr": "head.lr",
    "concurrent_head": "head.concurrent",
    "checkpoint_every": "train.checkpoint_every",
    "checkpoint_seconds": "train.checkpoint_seconds",
    "tensorboard": "train.tensorboard",
    "stages": "ray.stages",
    "gpus_per_stage": "ray.gpus_per_stage",
    "cpus_per_stage": "ray.cpus_per_stage",
    "strategy": "ray.strategy",
    "max_in_flight": "ray.max_in_flight",
    "batches_per_call": "ray.batches_per_call",
    "factors_on": "ray.factors_on",
}


def _sigma(text: str) -> float | str:
    return NULL if text == "median" else float(text)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = JobArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(p)
    p.add_argument("--trainer", choices=TRAINERS, help="where the layers train (default ray)")
    p.add_argument(
        "--estimator",
        choices=ESTIMATORS,
        help="plausible: HSIC(Z,Z) replaces HSIC(Z,X); beta is its gamma (2 in the paper)",
    )
    p.add_argument("--sigma", type=_sigma, help="kernel bandwidth (scaled by each variable's dimension), or 'median'")
    p.add_argument("--beta", type=float, help="weight of nHSIC(Z, Y) in each layer's loss")
    p.add_argument("--lr", type=float, help="SGD learning rate of the HSIC layers")
    p.add_argument("--lr-schedule", choices=LR_SCHEDULES, help="constant, or cosine: annealed to 0 over the run")
    p.add_argument("--format-epochs", type=int, help="epochs of the format head on the frozen network")
    p.add_argument("--format-lr", type=float, help="SGD learning rate of the format head")
    p.add_argument(
        "--concurrent-head", action="store_true", default=None, help="also train the head during HSIC training"
    )
    p.add_argument("--device", choices=("auto", "cpu", "cuda"))
    p.add_argument(
        "--cuda-graphs", choices=CUDA_GRAPHS, help="each stage's step as one CUDA graph (default auto: on CUDA)"
    )
    p.add_argument(
        "--checkpoint-seconds",
        type=float,
        help="a checkpoint once this long has passed since the last (default 60; 0: none by time)",
    )
    p.add_argument(
        "--checkpoint-every",
        type=int,
        help="also a checkpoint at every multiple of this many steps (default 0: none by steps)",
    )
    p.add_argument(
        "--tensorboard",
        action="store_true",
        default=None,
        help="TensorBoard event files in OUTPUT/tensorboard/ (pip install 'hsic-ray[tensorboard]')",
    )
    ray = p.add_argument_group("ray trainer")
    ray.add_argument("--stages", type=int, help="stage actors (default: one per GPU, else one per free CPU)")
    ray.add_argument("--gpus-per-stage", type=float, help="GPUs per stage; fractions share a GPU")
    ray.add_argument("--cpus-per-stage", type=float, help="CPUs (and torch threads) per stage")
    ray.add_argument("--strategy", choices=STRATEGIES, help="placement group strategy (default PACK)")
    ray.add_argument(
        "--max-in-flight", type=int, help="batches in the pipeline at once (default 2 x stages x batches per call)"
    )
    ray.add_argument(
        "--batches-per-call", type=int, help="batches a stage takes per actor call (default: from measured times)"
    )
    ray.add_argument(
        "--factors-on",
        choices=FACTORS_ON,
        help="where each batch's factors are computed, once for every "
        "stage (default: first_stage when stages have GPUs, else coordinator)",
    )
    return p.parse_intermixed_args(argv)  # KEY=VALUE settings may stand between flags


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)

    def train() -> int:
        metrics = run_hsic(build_run_config(args, RUN_FLAGS, HSIC_FLAGS), resume=args.resume)
        unformatted, formatted = metrics["test_accuracy_unformatted"], metrics["test_accuracy_formatted"]
        print(f"test accuracy: unformatted {unformatted}, formatted {formatted:.2f}")
        return 0

    return run_job(train)


if __name__ == "__main__":
    sys.exit(main())

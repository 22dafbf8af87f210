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
import sys

from hsic_ray.cli import (
    BACKPROP_FLAGS,
    RUN_FLAGS,
    JobArgumentParser,
    accuracy_text,
    add_run_arguments,
    build_run_config,
    exit_job,
    run_job,
    setup_logging,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = JobArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(p, BACKPROP_FLAGS)
    ray = p.add_argument_group("ray train")
    ray.add_argument("--workers", type=int, default=1, help="data-parallel Ray Train workers (default %(default)s)")
    ray.add_argument("--use-gpu", action="store_true", help="one GPU per worker")
    ray.add_argument(
        "--cpus-per-worker", type=float, default=1.0, help="CPUs (and torch threads) per worker (default %(default)s)"
    )
    ray.add_argument(
        "--max-failures", type=int, default=0, help="worker failures Ray Train retries from the latest checkpoint"
    )
    return p.parse_intermixed_args(argv)  # KEY=VALUE settings may stand between flags


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = parse_args(argv)

    def train() -> int:
        from ray.train import TrainingFailedError  # torch and Ray: not for --help or a bad flag

        from hsic_ray.train_backprop import train_backprop, training_failure

        cfg = build_run_config(args, RUN_FLAGS, BACKPROP_FLAGS)
        try:
            metrics = train_backprop(
                cfg,
                resume=args.resume,
                workers=args.workers,
                use_gpu=args.use_gpu,
                cpus_per_worker=args.cpus_per_worker,
                max_failures=args.max_failures,
            )
        except TrainingFailedError as exc:
            print(f"error: {training_failure(exc)}", file=sys.stderr)
            return 1
        print(
            f"test accuracy: formatted {accuracy_text(metrics['test_accuracy_formatted'])} "
            f"after {metrics['epochs']} epochs "
            f"({metrics['steps']} steps, {metrics['samples_per_second']:.0f} samples/s)"
        )
        return 0

    return run_job(train)


if __name__ == "__main__":
    exit_job(main())

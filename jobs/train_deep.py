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

from hsic_ray.cli import (
    HSIC_FLAGS,
    RUN_FLAGS,
    JobArgumentParser,
    accuracy_text,
    add_run_arguments,
    build_run_config,
    exit_job,
    run_job,
    setup_logging,
)
from hsic_ray.launch import run_hsic_job


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = JobArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(p, HSIC_FLAGS)
    return p.parse_intermixed_args(argv)  # KEY=VALUE settings may stand between flags


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = parse_args(argv)

    def train() -> int:
        metrics = run_hsic_job(build_run_config(args, RUN_FLAGS, HSIC_FLAGS), resume=args.resume)
        unformatted, formatted = metrics["test_accuracy_unformatted"], metrics["test_accuracy_formatted"]
        print(f"test accuracy: unformatted {accuracy_text(unformatted)}, formatted {accuracy_text(formatted)}")
        return 0

    return run_job(train)


if __name__ == "__main__":
    exit_job(main())

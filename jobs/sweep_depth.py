"""Sweep depth (and optionally beta, sigma, lr, estimator) with Ray Tune, comparing HSIC with backprop.

    python jobs/sweep_depth.py --smoke-test                    # two depths x two methods, a few minutes on 2 CPUs
    python jobs/sweep_depth.py --depths 5 10 20 50 --epochs 5  # the full depth sweep
    python jobs/sweep_depth.py --output runs/sweep --resume    # continue an interrupted sweep
    python jobs/sweep_depth.py --depths 5 50 --methods hsic \
        --grid model.activation=relu,elu --grid train.batch_size=256,512

Writes results.csv, results.md and accuracy_vs_depth.png to --output, and prints the table.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from hsic_ray.cli import JobArgumentParser, add_data_family_argument, grid_axis, run_job
from hsic_ray.config import ESTIMATORS, PRESETS
from hsic_ray.sweep import METHODS, SweepSpec, failed_trials, markdown_table, run_sweep

SMOKE = {
    "depths": [2, 4],
    "overrides": {
        "model.width": 64,
        "train.epochs": 2,
        "train.batch_size": 256,
        "head.epochs": 2,
        "train.log_every": 50,
    },
}


def parse_args(argv=None) -> argparse.Namespace:
    p = JobArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="deep_mlp")
    p.add_argument("--depths", type=int, nargs="+", default=[5, 10, 20, 50])
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--betas", type=float, nargs="+", help="grid over hsic.beta")
    p.add_argument("--sigmas", type=float, nargs="+", help="grid over hsic.sigma")
    p.add_argument("--lrs", type=float, nargs="+", help="grid over optim.lr (HSIC layers)")
    p.add_argument("--estimators", nargs="+", choices=ESTIMATORS, help="grid over hsic.estimator")
    p.add_argument(
        "--grid",
        type=grid_axis,
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="grid over any config setting, e.g. model.activation=relu,elu (repeatable)",
    )
    p.add_argument("--dataset", help="data source for every trial (default: the preset's)")
    add_data_family_argument(p)
    p.add_argument("--width", type=int)
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--max-steps", type=int)
    p.add_argument("--stages-per-trial", type=int, default=2, help="stage actors of each HSIC trial")
    p.add_argument("--gpus-per-stage", type=float, default=0.0)
    p.add_argument("--max-concurrent", type=int, default=1, help="trials running at once")
    p.add_argument("--asha", action="store_true", help="stop weak trials early (ASHA, by epoch)")
    p.add_argument(
        "--smoke-test",
        "--smoke",
        dest="smoke",
        action="store_true",
        help="two small depths, tiny nets: a check that runs in minutes",
    )
    p.add_argument("--resume", action="store_true", help="restore the interrupted sweep in --output")
    p.add_argument("--ray-address")
    p.add_argument("--output", default=f"runs/sweep-{time.strftime('%Y%m%d-%H%M%S')}")
    return p.parse_args(argv)


def build_spec(args: argparse.Namespace) -> SweepSpec:
    overrides = dict(SMOKE["overrides"]) if args.smoke else {}
    flags = {
        "data.source": args.dataset,
        "data.family": args.data_family,
        "model.width": args.width,
        "train.epochs": args.epochs,
        "train.batch_size": args.batch_size,
        "train.max_steps": args.max_steps,
    }
    overrides.update({k: v for k, v in flags.items() if v is not None})
    grid_flags = {
        "hsic.beta": args.betas,
        "hsic.sigma": args.sigmas,
        "optim.lr": args.lrs,
        "hsic.estimator": args.estimators,
    }
    return SweepSpec(
        preset=args.preset,
        depths=SMOKE["depths"] if args.smoke else args.depths,
        methods=args.methods,
        grid={**{k: v for k, v in grid_flags.items() if v}, **dict(args.grid)},
        overrides=overrides,
        stages_per_trial=args.stages_per_trial,
        gpus_per_stage=args.gpus_per_stage,
        max_concurrent_trials=args.max_concurrent,
        asha=args.asha,
        output=args.output,
    )


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)

    def sweep() -> int:
        rows = run_sweep(build_spec(args), resume=args.resume, address=args.ray_address)
        print(markdown_table(rows))
        failed = failed_trials(rows)
        if failed:
            print(f"error: {failed}; Tune's logs of each trial are under {args.output}/tune", file=sys.stderr)
            return 1
        return 0

    return run_job(sweep)


if __name__ == "__main__":
    sys.exit(main())

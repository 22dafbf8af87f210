"""Sweep depth (and optionally beta, sigma, lr, estimator) with Ray Tune, comparing HSIC with backprop.

    python jobs/sweep_depth.py --smoke-test                    # two depths x two methods, tiny trials one at a time
    python jobs/sweep_depth.py --depths 5 10 20 50 --epochs 5  # the full depth sweep
    python jobs/sweep_depth.py --output runs/sweep --resume    # continue an interrupted sweep
    python jobs/sweep_depth.py --depths 5 50 --methods hsic \
        --grid model.activation=relu,elu --grid train.batch_size=256,512
    python jobs/sweep_depth.py --combine runs/sweep-a runs/sweep-b --output runs/both  # one table and plot

Writes results.csv, results.md and accuracy_vs_depth.png to --output, and prints the table.
"""

from __future__ import annotations

import argparse
import sys
import time

from hsic_ray.cli import (
    DEFAULT_PRESET,
    SWEEP_FLAGS,
    SWEEP_GRID_FLAGS,
    JobArgumentParser,
    add_config_flags,
    exit_job,
    flag_overrides,
    grid_axis,
    run_job,
    setup_logging,
)
from hsic_ray.presets import PRESETS, SMOKE_TEST
from hsic_ray.sweep_spec import DEPTHS, METHODS, SweepSpec

SMOKE_DEPTHS = [2, 4]  # a smoke sweep: these depths (unless --depths is given), each trial with --smoke-test's settings


def parse_args(argv=None) -> argparse.Namespace:
    p = JobArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default=DEFAULT_PRESET)
    p.add_argument(
        "--depths",
        type=int,
        nargs="+",
        help=f"default: {' '.join(map(str, DEPTHS))} (--smoke-test: {' '.join(map(str, SMOKE_DEPTHS))})",
    )
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    add_config_flags(p, SWEEP_GRID_FLAGS, grid=True)
    p.add_argument(
        "--grid",
        type=grid_axis,
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="grid over any config setting, e.g. model.activation=relu,elu (repeatable)",
    )
    add_config_flags(p, SWEEP_FLAGS)
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
    p.add_argument(
        "--combine",
        nargs="+",
        metavar="SWEEP",
        help="write finished sweeps' results (their --output directories) as one table and plot to --output; "
        "trains nothing",
    )
    p.add_argument("--ray-address")
    p.add_argument("--output", default=f"runs/sweep-{time.strftime('%Y%m%d-%H%M%S')}")
    return p.parse_args(argv)


def build_spec(args: argparse.Namespace) -> SweepSpec:
    overrides = {**(SMOKE_TEST if args.smoke else {}), **flag_overrides(args, SWEEP_FLAGS)}
    grids = {field: values for field, values in flag_overrides(args, SWEEP_GRID_FLAGS).items() if values}
    return SweepSpec(
        preset=args.preset,
        depths=args.depths or (SMOKE_DEPTHS if args.smoke else list(DEPTHS)),
        methods=args.methods,
        grid={**grids, **dict(args.grid)},
        overrides=overrides,
        stages_per_trial=args.stages_per_trial,
        gpus_per_stage=args.gpus_per_stage,
        max_concurrent_trials=args.max_concurrent,
        asha=args.asha,
        output=args.output,
    )


def main(argv=None) -> int:
    setup_logging()
    args = parse_args(argv)

    def sweep() -> int:
        if args.combine:
            from hsic_ray.sweep_results import combine_sweeps, results_markdown

            print(results_markdown(combine_sweeps(args.combine, args.output)))
            return 0
        spec = build_spec(args)
        spec.check()  # before torch and Ray are imported: bad settings answer at once
        from hsic_ray.sweep import run_sweep
        from hsic_ray.sweep_results import failed_trials, results_markdown

        rows = run_sweep(spec, resume=args.resume, address=args.ray_address)
        print(results_markdown(rows))
        failed = failed_trials(rows)
        if failed:
            print(f"error: {failed}; Tune's logs of each trial are under {args.output}/tune", file=sys.stderr)
            return 1
        return 0

    return run_job(sweep)


if __name__ == "__main__":
    exit_job(main())

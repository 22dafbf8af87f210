"""What starting a local Ray cluster costs: CPU seconds per process Ray starts, and the wall time to a first task.

    python benchmarks/ray_start_cost.py             # a cluster as a job starts it (2 logical CPUs, no dashboard)
    python benchmarks/ray_start_cost.py --cpus 5    # more logical CPUs: more idle workers started

Starts a new local cluster the way hsic_ray's jobs do when none is running (`ray.init(address="local")`, the
dashboard left out), runs one empty task, waits `--settle` seconds for the cluster's processes to finish
starting, then lists every process of the cluster (the driver's descendants), with the CPU time it used, and
the driver's own.
Every job that starts its own cluster pays this, and so does every test that does.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time

import psutil
import ray


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpus", type=float, default=2.0, help="the cluster's logical CPUs")
    p.add_argument("--settle", type=float, default=6.0, help="seconds to wait before counting")
    args = p.parse_args(argv)

    started = time.time()
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    ray.get(ray.remote(lambda: None).remote())
    to_first_task = time.time() - started
    time.sleep(args.settle)
    rows = []
    for proc in psutil.Process().children(recursive=True):  # the cluster's processes, all started by ray.init
        with contextlib.suppress(psutil.NoSuchProcess):
            times = proc.cpu_times()
            rows.append((times.user + times.system, _label(proc.cmdline() or [proc.name()])))
    driver = sum(psutil.Process().cpu_times()[:2])
    ray.shutdown()

    print(f"ray.init and a first task: {to_first_task:.2f} s wall; the cluster's processes after {args.settle:g} s:")
    print("| process | CPU s |\n|---|---|")
    for cpu, label in sorted(rows, reverse=True):
        print(f"| {label} | {cpu:.2f} |")
    print(f"| all of the cluster's | {sum(cpu for cpu, _ in rows):.2f} |")
    print(f"| the driver (imports, ray.init, the task) | {driver:.2f} |")
    return 0


def _label(cmdline: list[str]) -> str:
    """A process's short name: Ray's title (ray::IDLE), or the program's file name."""
    if cmdline[0].startswith("ray::"):
        return cmdline[0].split()[0]
    program = next((part for part in cmdline if part.endswith(".py")), cmdline[0])
    return program.rsplit("/", 1)[-1]


if __name__ == "__main__":
    sys.exit(main())

"""What starting a local Ray cluster costs: CPU seconds per process Ray starts, and the wall time to a first task.

    python benchmarks/ray_start_cost.py             # a cluster as a job starts it (2 logical CPUs, no dashboard)
    python benchmarks/ray_start_cost.py --cpus 5    # more logical CPUs: more idle workers started
    python benchmarks/ray_start_cost.py --preload torch   # its workers import torch as they start
    python benchmarks/ray_start_cost.py --setup-hook      # each worker imports torch as the job's runtime env starts it
    python benchmarks/ray_start_cost.py --profile-init 12  # where ray.init's own wall time goes

Starts a new local cluster the way hsic_ray's jobs do when none is running (`ray.init(address="local")`, the
dashboard left out), runs one empty task, waits `--settle` seconds for the cluster's processes to finish
starting, then lists every process of the cluster (the driver's descendants), with the CPU time it used, and
the driver's own; then times an actor that imports torch (as a stage actor does), from its creation to its
first answer. With `--preload`, the cluster's workers import those modules as they start (Ray's
`preload_python_modules`), ahead of any actor, while the driver goes on with its own work (here: the wait).
With `--profile-init N`, ray.init runs under cProfile and its N costliest calls (cumulative time) are printed:
what in the driver's wait is Ray polling for the processes it started. With `--setup-hook`, the job's runtime
environment has every worker it starts import torch first (Ray's `worker_process_setup_hook`); the last line
says whether the actor found a worker started ahead of it.
Every job that starts its own cluster pays this, and so does every test that does.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import os
import pstats
import sys
import time

import psutil
import ray


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpus", type=float, default=2.0, help="the cluster's logical CPUs")
    p.add_argument("--settle", type=float, default=6.0, help="seconds to wait before counting")
    p.add_argument("--preload", nargs="+", default=[], metavar="MODULE", help="modules workers import as they start")
    p.add_argument("--setup-hook", action="store_true", help="workers the job starts import torch first")
    p.add_argument("--profile-init", type=int, default=0, metavar="N", help="print ray.init's N costliest calls")
    args = p.parse_args(argv)
    if args.profile_init < 0:
        p.error(f"--profile-init {args.profile_init}: how many calls to print, 0 (none) or more")

    started = time.time()
    system_config = {"preload_python_modules": args.preload} if args.preload else None
    profile = cProfile.Profile() if args.profile_init else contextlib.nullcontext()
    with profile:
        ray.init(
            address="local",
            num_cpus=args.cpus,
            include_dashboard=False,
            log_to_driver=False,
            _system_config=system_config,
            runtime_env={"worker_process_setup_hook": _import_torch} if args.setup_hook else None,
        )
    init_seconds = time.time() - started
    ray.get(ray.remote(lambda: None).remote())
    to_first_task = time.time() - started
    time.sleep(args.settle)
    rows, idle = [], set()  # idle: the workers Ray started ahead of any task or actor that needs them
    for proc in psutil.Process().children(recursive=True):  # the cluster's processes, all started by ray.init
        with contextlib.suppress(psutil.NoSuchProcess):
            times = proc.cpu_times()
            rows.append((times.user + times.system, _label(proc.cmdline() or [proc.name()])))
            if proc.name() == "ray::IDLE":
                idle.add(proc.pid)
    driver = sum(psutil.Process().cpu_times()[:2])
    created = time.time()
    actor_pid = ray.get(TorchActor.remote().pid.remote())
    actor_ready = time.time() - created
    ray.shutdown()

    print(f"ray.init {init_seconds:.2f} s and a first task: {to_first_task:.2f} s wall")
    if args.profile_init:
        pstats.Stats(profile, stream=sys.stdout).sort_stats("cumulative").print_stats(args.profile_init)
    print(f"the cluster's processes after {args.settle:g} s:")
    print("| process | CPU s |\n|---|---|")
    for cpu, label in sorted(rows, reverse=True):
        print(f"| {label} | {cpu:.2f} |")
    print(f"| all of the cluster's | {sum(cpu for cpu, _ in rows):.2f} |")
    print(f"| the driver (imports, ray.init, the task) | {driver:.2f} |")
    print(
        f"\nan actor that imports torch, created {args.settle:g} s after the first task: ready in {actor_ready:.2f} s, "
        f"on a worker started ahead of it: {'yes' if actor_pid in idle else 'no'}"
    )
    return 0


@ray.remote(num_cpus=1)
class TorchActor:
    def __init__(self):
        import torch  # noqa: F401  (its import is what a stage actor's start costs)

    def pid(self) -> int:
        return os.getpid()


def _import_torch() -> None:
    import torch  # noqa: F401


def _label(cmdline: list[str]) -> str:
    """A process's short name: Ray's title (ray::IDLE), or the program's file name."""
    if cmdline[0].startswith("ray::"):
        return cmdline[0].split()[0]
    program = next((part for part in cmdline if part.endswith(".py")), cmdline[0])
    return program.rsplit("/", 1)[-1]


if __name__ == "__main__":
    sys.exit(main())

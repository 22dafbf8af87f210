"""What a user waits for: each job's wall time, from the command to its exit, split into where it went.

    python benchmarks/wall_clock.py                                   # the default job, in process and on Ray
    python benchmarks/wall_clock.py --cases default paper_mlp deep_mlp50 \
        --dataset npz:../shared/datasets/fashion-mnist-dev.npz --json benchmarks/results/wall_clock.json
    python benchmarks/wall_clock.py --cases paper_mlp --trainers local --epochs 1 -- train.monitor_every=5
    python benchmarks/wall_clock.py --cases smoke --repeats 3         # --smoke-test, three times each
    git worktree add /tmp/before HEAD~1 && \
    python benchmarks/wall_clock.py --cases smoke --repeats 3 --checkouts /tmp/before .   # a change, A/B

Each case runs `jobs/train_deep.py` as its own process, the way a user starts it, and is timed from launch to
exit. The split comes from the run's metrics.json (`phase_seconds`, hsic_ray/timeline.py): start-up (the process
before the run, data and output checks, Ray, the stage actors), training, each per-epoch monitor, the end of the
run (head, final evaluation, final probes), writing and plots; `exit` is what is left (shutting Ray and the
interpreter down). Settings after `--` apply to every case. With several `--checkouts`, each case runs with
each checkout's code in turn, so that a change is measured side by side with the code before it while the
machine's speed drifts. `machine_cpu_seconds` is the whole machine's busy CPU time during the run (Linux's
/proc/stat; Ray's processes included), on a machine with nothing else to do.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from job_runs import REPO, markdown_table, python_path_from, run_each, run_process, write_results

CASES = {  # name -> the job's arguments (a dataset is added where the case reads one)
    "default": [],
    "smoke": ["--smoke-test"],
    "paper_mlp": ["--preset", "paper_mlp", "--epochs", "5"],
    "deep_mlp50": ["--preset", "deep_mlp", "--depth", "50", "--epochs", "5"],
}
READS_DATASET = {"paper_mlp", "deep_mlp50"}

GROUPS = {  # a column of the table: the phases it adds up
    "start-up": ("before_run", "data", "ray", "actors"),
    "train": ("train",),
    "monitors": ("calibration", "information_plane", "probes", "epoch_readout"),
    "end": ("head", "final_evaluation", "final_probes"),
    "write": ("writing", "plots", "checkpoints"),
}


def run_case(case: str, trainer: str, checkout: Path, args: argparse.Namespace, workdir: Path) -> dict:
    output = workdir / f"{case}-{trainer}-{len(list(workdir.glob(f'{case}-{trainer}-*')))}"  # one per run
    job = str(checkout / "jobs" / "train_deep.py")
    command = [sys.executable, job, *CASES[case], "--trainer", trainer, "--output", str(output)]
    if case in READS_DATASET:
        command += ["--dataset", absolute_source(args.dataset), "--data-family", "fashion-mnist"]
    if args.epochs is not None:
        command += ["--epochs", str(args.epochs)]
    command += args.settings
    busy, started = machine_busy_seconds(), time.time()
    # From the checkout: Ray's workers put the driver's working directory first on their path.
    env = {**os.environ, "PYTHONPATH": python_path_from(checkout)}
    run_process(command, f"{case} ({trainer}, {checkout})", env=env, cwd=checkout)
    wall, busy = time.time() - started, machine_busy_seconds() - busy
    metrics = json.loads((output / "metrics.json").read_text())
    phases = metrics["phase_seconds"]
    return {
        "case": case,
        "trainer": trainer,
        "checkout": str(checkout),
        "commit": _commit(checkout),
        "command": " ".join(command[1:]),
        "wall_seconds": wall,
        "phase_seconds": phases,
        "exit_seconds": max(0.0, wall - phases["total"]),
        "machine_cpu_seconds": busy,
        "test_accuracy_formatted": metrics["test_accuracy_formatted"],
    }


def absolute_source(source: str) -> str:
    """An npz: source's path made absolute from the repository root (the jobs run from their checkout)."""
    kind, _, path = source.partition(":")
    return f"{kind}:{(REPO / path).resolve()}" if kind == "npz" and path else source


def machine_busy_seconds() -> float:
    """CPU seconds every core of this machine has been busy since boot (Linux), NaN where unknown."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return math.nan
    user, nice, system, idle, iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _commit(checkout: Path) -> str | None:
    """The checkout's commit; None for a copy without git (a lent GPU machine's)."""
    try:
        done = subprocess.run(
            ["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        )
    except OSError:
        return None
    return done.stdout.strip() or None


def table(results: list[dict]) -> str:
    rows = []
    for r in results:
        phases = r["phase_seconds"]
        groups = [sum(phases.get(p, 0.0) for p in names) for names in GROUPS.values()]
        share = 100 * phases.get("train", 0.0) / r["wall_seconds"]
        cells = [r["case"], r["trainer"], r["commit"] or "-", f"{r['wall_seconds']:.1f}"]
        cells += [f"{r['machine_cpu_seconds']:.1f}", *(f"{g:.1f}" for g in groups)]
        cells += [f"{r['exit_seconds']:.1f}", f"{share:.0f}", f"{r['test_accuracy_formatted']:.2f}"]
        rows.append(cells)
    header = ["case", "trainer", "commit", "wall s", "machine CPU s", *GROUPS, "exit", "train %", "formatted %"]
    return markdown_table(header, rows)


def phase_table(results: list[dict]) -> str:
    names = sorted({p for r in results for p in r["phase_seconds"] if p != "total"}, key=_phase_order)
    header = ["phase", *(f"{r['case']} {r['trainer']} {r['commit'] or ''}".strip() for r in results)]
    rows = [[name, *(f"{r['phase_seconds'].get(name, 0.0):.2f}" for r in results)] for name in names]
    return markdown_table(header, rows)


def _phase_order(name: str) -> int:
    order = [p for names in GROUPS.values() for p in names]
    return order.index(name) if name in order else len(order)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", choices=sorted(CASES), default=["default"])
    p.add_argument("--trainers", nargs="+", choices=["local", "ray"], default=["local", "ray"])
    p.add_argument(
        "--dataset", default="npz:../shared/datasets/fashion-mnist-dev.npz", help="for paper_mlp, deep_mlp50"
    )
    p.add_argument("--epochs", type=int, help="override every case's epochs (e.g. 1 for a quick look)")
    p.add_argument("--repeats", type=int, default=1, help="run every case this many times, in turn")
    p.add_argument(
        "--checkouts", nargs="+", type=Path, default=[REPO], metavar="DIR", help="run each case with each one's code"
    )
    p.add_argument("--json", metavar="PATH", help="write the results here too")
    p.add_argument("settings", nargs="*", metavar="KEY=VALUE", help="settings for every case (after --)")
    args = p.parse_args(argv)
    variants = [(trainer, checkout.resolve()) for trainer in args.trainers for checkout in args.checkouts]
    results = run_each(
        args.cases * args.repeats, variants, lambda case, variant, workdir: run_case(case, *variant, args, workdir)
    )
    print(table(results), "", phase_table(results), sep="\n")
    if args.json:
        write_results(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A training step with and without the process keeping the memory it frees (hsic_ray.machine.keep_freed_memory).

    python benchmarks/memory_reuse.py                                # deep_mlp at depths 10 and 50, paper_mlp at 5
    python benchmarks/memory_reuse.py --cases deep_mlp:20 --rounds 3 --json out.json

Each case's HSIC step (every layer in one stage, as `benchmarks/bench_local.py` times it) and its eager
backprop step run in two fresh processes, one with glibc's malloc as it comes and one that keeps freed memory,
in alternating rounds (this machine's speed drifts); each keeps its fastest round. Prints ms per step and the
page faults a step takes in each, and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from hsic_ray.machine import glibc_version

CHILD = """
import json, resource, sys
sys.path.insert(0, {bench!r})
from bench_local import backprop_step_fn, hsic_step_fn, _timed
from hsic_ray.machine import keep_freed_memory

preset, depth, keep, steps = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "keep", int(sys.argv[4])
applied = keep and keep_freed_memory()
figures = {{"keeps_freed_memory": applied}}
for name, make in (("hsic", hsic_step_fn), ("backprop", backprop_step_fn)):
    step = make(depth, "cpu", preset=preset)
    _timed(step, 1, warmup=3)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    figures[name + "_ms"] = 1e3 * _timed(step, steps, warmup=0)
    figures[name + "_faults"] = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / steps
print(json.dumps(figures))
"""


def _run(preset: str, depth: int, mode: str, steps: int) -> dict:
    code = CHILD.format(bench=str(Path(__file__).parent))
    out = subprocess.run(
        [sys.executable, "-c", code, preset, str(depth), mode, str(steps)], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.splitlines()[-1])


def measure(preset: str, depth: int, steps: int, rounds: int) -> dict:
    best: dict[str, dict] = {}
    for _ in range(rounds):
        for mode in ("default", "keep"):
            got = _run(preset, depth, mode, steps)
            if mode not in best or got["hsic_ms"] < best[mode]["hsic_ms"]:
                best[mode] = got
    return {
        "preset": preset,
        "depth": depth,
        **{f"{mode}_{k}": v for mode, run in best.items() for k, v in run.items()},
    }


def _case(text: str) -> tuple[str, int]:
    from hsic_ray.presets import PRESETS

    preset, _, depth = text.partition(":")
    if preset not in PRESETS or not depth.isdigit() or int(depth) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not PRESET:DEPTH (presets: {', '.join(sorted(PRESETS))})")
    return preset, int(depth)


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number >= 1")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--cases", nargs="+", type=_case, default=["deep_mlp:10", "deep_mlp:50", "paper_mlp:5"], help="PRESET:DEPTH"
    )
    p.add_argument("--steps", type=_positive, default=3, help="timed steps per round")
    p.add_argument("--rounds", type=_positive, default=2, help="alternating rounds of the two processes")
    p.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = p.parse_args(argv)
    if args.json and not Path(args.json).parent.is_dir():
        p.error(f"--json {args.json}: its directory does not exist; create it first")

    rows = []
    print(f"# memory reuse ({platform.machine()}, {os.cpu_count()} cores, {glibc_version() or 'not glibc'})")
    print(
        "| case | HSIC ms, default | HSIC ms, kept | ratio | faults/step, default | kept "
        "| backprop ms, default | kept |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for preset, depth in args.cases:
        row = measure(preset, depth, args.steps, args.rounds)
        rows.append(row)
        print(
            f"| {preset} depth {depth} | {row['default_hsic_ms']:.1f} | {row['keep_hsic_ms']:.1f} | "
            f"{row['keep_hsic_ms'] / row['default_hsic_ms']:.2f}x | {row['default_hsic_faults']:,.0f} | "
            f"{row['keep_hsic_faults']:,.0f} | {row['default_backprop_ms']:.1f} | {row['keep_backprop_ms']:.1f} |",
            flush=True,
        )
    if args.json:
        machine = {
            "platform": platform.platform(),
            "cores": os.cpu_count(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        }
        Path(args.json).write_text(json.dumps({"machine": machine, "results": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

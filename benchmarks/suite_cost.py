"""What the test suite costs in CPU seconds, test by test and module by module.

    python benchmarks/suite_cost.py                          # the whole suite, one test at a time
    python benchmarks/suite_cost.py -- tests/test_sweep.py   # pytest's own arguments after --
    python benchmarks/suite_cost.py --json benchmarks/results/suite_cost_cpu2.json -- -n 2 --dist loadgroup

A test's CPU is hard to see from outside: its Ray clusters and jobs start processes that outlive it, or that
the process which started them never waits for, and a machine-wide count takes in everything else the machine
does. So pytest runs in a cgroup of its own (cgroup v1 `cpuacct`, which needs root): every process it starts,
however deep and however it ends, is counted there, and nothing else is. With pytest-xdist (`-n 2`) only the
whole run's figure means anything, since tests overlap; one at a time (the default) each test gets its own.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

CGROUPS = Path("/sys/fs/cgroup/cpuacct")
USAGE_ENV = "SUITE_COST_USAGE_FILE"  # the cgroup's counter, read by the plugin below in each pytest process
RECORDS_ENV = "SUITE_COST_RECORDS"  # where the plugin appends one JSON line per test
LEFTOVER_WAIT_S = 30


def cgroup_seconds(usage_file: str | Path) -> float:
    return int(Path(usage_file).read_text()) / 1e9


# --- the pytest plugin (`-p benchmarks.suite_cost`), run inside the cgroup ------------------------------------


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):  # noqa: ARG001 (pytest's hook signature)
    usage, records = os.environ.get(USAGE_ENV), os.environ.get(RECORDS_ENV)
    if not usage or not records:
        yield
        return
    cpu, wall = cgroup_seconds(usage), time.perf_counter()
    yield
    record = {
        "test": item.nodeid,
        "worker": os.environ.get("PYTEST_XDIST_WORKER", "main"),
        "wall_s": time.perf_counter() - wall,
        "cpu_s": cgroup_seconds(usage) - cpu,
    }
    with open(records, "a") as f:
        f.write(json.dumps(record) + "\n")


# --- the driver ------------------------------------------------------------------------------------------------


def new_cgroup() -> Path:
    if not os.access(CGROUPS, os.W_OK):
        sys.exit(
            f"suite_cost: cannot create a cgroup under {CGROUPS} (needs cgroup v1 cpuacct and root); "
            "run it as root on such a machine"
        )
    group = CGROUPS / f"hsic-ray-suite-{os.getpid()}"
    group.mkdir()
    return group


def run_pytest(pytest_args: list[str], group: Path, records: Path) -> tuple[int, float, float]:
    """pytest in `group`; its exit code, wall seconds and the cgroup's CPU seconds, once the processes its
    tests left behind have ended (Ray's agents outlive a killed raylet by a few seconds)."""
    env = {**os.environ, USAGE_ENV: str(group / "cpuacct.usage"), RECORDS_ENV: str(records)}
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))

    def join_group() -> None:
        (group / "tasks").write_text(str(os.getpid()))

    started = time.perf_counter()
    command = [sys.executable, "-m", "pytest", "-p", "benchmarks.suite_cost", *pytest_args]
    code = subprocess.call(command, env=env, cwd=root, preexec_fn=join_group)
    wall = time.perf_counter() - started
    deadline = time.monotonic() + LEFTOVER_WAIT_S
    while leftover_processes(group) and time.monotonic() < deadline:
        time.sleep(1)
    return code, wall, cgroup_seconds(group / "cpuacct.usage")


def leftover_processes(group: Path) -> list[str]:
    """The processes still in `group`, each as `pid command`."""
    found = []
    for pid in (group / "tasks").read_text().split():
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:  # gone meanwhile
            continue
        found.append(f"{pid} {command[:120]}")
    return found


def by_module(tests: list[dict]) -> list[dict]:
    modules: dict[str, dict] = collections.defaultdict(lambda: {"tests": 0, "cpu_s": 0.0, "wall_s": 0.0})
    for t in tests:
        m = modules[t["test"].split("::")[0]]
        m["tests"] += 1
        m["cpu_s"] += t["cpu_s"]
        m["wall_s"] += t["wall_s"]
    return sorted(({"module": k, **v} for k, v in modules.items()), key=lambda m: -m["cpu_s"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--top", type=int, default=20, help="the costliest tests to list")
    p.add_argument("--json", help="write the figures here")
    p.add_argument("pytest_args", nargs="*", help="pytest's arguments (after --); default: the whole suite, -n 0")
    args = p.parse_args(argv)
    pytest_args = args.pytest_args or ["-n", "0", "-q"]
    group = new_cgroup()
    with tempfile.TemporaryDirectory() as tmp:
        records = Path(tmp) / "tests.jsonl"
        records.touch()
        code, wall, cpu = run_pytest(pytest_args, group, records)
        tests = [json.loads(line) for line in records.read_text().splitlines()]
    left = leftover_processes(group)
    if left:
        print(f"{len(left)} processes the tests started still ran {LEFTOVER_WAIT_S} s after pytest ended:")
        print("\n".join(left[:20]))
    else:
        group.rmdir()
    parallel = len({t["worker"] for t in tests}) > 1  # tests overlapped: only the whole run's figure holds
    print(f"\npytest {' '.join(pytest_args)}: exit {code}, {len(tests)} tests, {wall:.0f} s wall, {cpu:.0f} CPU s")
    print(f"the CPU if the machine's {os.cpu_count()} cores shared it perfectly: {cpu / os.cpu_count() / 60:.1f} min")
    modules = by_module(tests)
    if not parallel:
        print("\n| module | tests | CPU s | wall s |\n|---|---|---|---|")
        for m in modules:
            print(f"| {m['module']} | {m['tests']} | {m['cpu_s']:.1f} | {m['wall_s']:.1f} |")
        print("\n| costliest tests | CPU s | wall s |\n|---|---|---|")
        for t in sorted(tests, key=lambda t: -t["cpu_s"])[: args.top]:
            print(f"| {t['test']} | {t['cpu_s']:.1f} | {t['wall_s']:.1f} |")
    if args.json:
        result = {
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": f"{os.uname().machine}, {os.cpu_count()} cores",
            "command": f"python benchmarks/suite_cost.py -- {' '.join(pytest_args)}",
            "exit_code": code,
            "wall_s": wall,
            "cpu_s": cpu,
            "processes_left_running": left,
            "modules": [] if parallel else modules,
            "tests": [] if parallel else tests,
        }
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return code


if __name__ == "__main__":
    sys.exit(main())

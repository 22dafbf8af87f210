"""What the benchmarks that time whole jobs as processes share (wall_clock.py, time_to_accuracy.py): their
tables, their JSON file, which names the machine they ran on, and the path their processes import from."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def python_path_from(checkout: Path) -> str:
    """A PYTHONPATH that imports hsic_ray from `checkout`, keeping this one's entries after it (packages installed
    outside the environment: a carried Ray)."""
    return os.pathsep.join(filter(None, [str(checkout), os.environ.get("PYTHONPATH")]))


def run_process(
    command: list[str], what: str, env: dict[str, str] | None = None, cwd: Path = REPO
) -> subprocess.CompletedProcess:
    """`command` run from `cwd` (the repository root), its output captured; a failure ends the benchmark, naming
    `what`."""
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{what} failed:\n{done.stderr[-3000:]}")
    return done


def run_each(cases: list[str], variants: list[Any], run: Callable[[str, Any, Path], dict]) -> list[dict]:
    """`run(case, variant, workdir)` for every case and variant, in order, saying which runs; their results.
    The runs write into one temporary directory, removed at the end."""
    results = []
    with tempfile.TemporaryDirectory(prefix="hsic-ray-bench-") as workdir:
        for case in cases:
            for variant in variants:
                print(f"running {case} ({variant}) ...", file=sys.stderr, flush=True)
                results.append(run(case, variant, Path(workdir)))
    return results


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in rows])


def write_results(path: str, results: list[dict]) -> None:
    """`results` and the machine (cores, GPU card, date) as JSON at `path`."""
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    machine = {"cpus": os.cpu_count(), "gpu": gpu, "date": time.strftime("%Y-%m-%d %H:%M %Z")}
    Path(path).write_text(json.dumps({"machine": machine, "results": results}, indent=1))

"""What the benchmarks that time whole jobs as processes share (wall_clock.py, time_to_accuracy.py): their
tables and their JSON file, which names the machine they ran on."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path


def run_each(cases: list[str], variants: list[str], run: Callable[[str, str, Path], dict]) -> list[dict]:
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

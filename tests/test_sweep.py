"""jobs/sweep_depth.py end to end: a smoke sweep on a real local Ray, resume, and a sweep too big to fit."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest

JOB = Path(__file__).resolve().parents[1] / "jobs" / "sweep_depth.py"


def run_sweep(*args, timeout=600):
    return subprocess.run([sys.executable, str(JOB), *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_smoke_sweep_writes_table_and_plot_and_resumes(tmp_path):
    out = tmp_path / "sweep"
    proc = run_sweep("--smoke", "--output", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted((r["method"], r["depth"]) for r in rows) == [("backprop", "2"), ("backprop", "4"), ("hsic", "2"), ("hsic", "4")]
    assert all(r["finished"] == "True" and 10 < float(r["test_accuracy"]) <= 100 for r in rows)
    assert all(float(r["test_accuracy_unformatted"]) > 10 for r in rows if r["method"] == "hsic")
    table = (out / "results.md").read_text()
    assert table.startswith("| depth | method |") and table in proc.stdout
    assert (out / "accuracy_vs_depth.png").read_bytes()[:4] == b"\x89PNG"
    trials = sorted(p.name for p in (out / "trials").iterdir())
    assert len(trials) == 4 and all((out / "trials" / t / "metrics.json").exists() or t.startswith("backprop") for t in trials)

    resumed = run_sweep("--smoke", "--output", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert sorted(p.name for p in (out / "trials").iterdir()) == trials  # finished trials are not rerun
    assert (out / "results.md").read_text() == table


def test_sweep_too_big_for_the_cluster_fails_fast(tmp_path):
    proc = run_sweep("--smoke", "--stages-per-trial", "3", "--gpus-per-stage", "1", "--output", str(tmp_path / "s"))
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: one HSIC trial needs") and "3 GPU" in last
    assert not (tmp_path / "s").exists()


def test_resume_without_a_sweep_is_refused(tmp_path):
    proc = run_sweep("--smoke", "--resume", "--output", str(tmp_path / "none"))
    assert proc.returncode == 2 and "no sweep to restore" in proc.stderr.strip().splitlines()[-1]

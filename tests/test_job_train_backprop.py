"""jobs/train_backprop.py as a user runs it: a real subprocess on the bundled digits, in a module of its own
so that no Ray cluster of the test process runs beside it (the job would join that one)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_job_output import error_lines, raw_number_lines

JOB = Path(__file__).resolve().parents[1] / "jobs" / "train_backprop.py"


def test_job_bad_input_is_one_clear_line(tmp_path):
    # As a user sees it; which input gets which message is tested in process (tests/test_bad_input.py).
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, str(JOB), "--workers", "0", "--output", str(out)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "workers=0 is invalid" in lines[-1]
    assert "Traceback" not in proc.stderr
    assert not out.exists()


@pytest.mark.slow
def test_job_smoke_test_runs_a_tiny_baseline(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, str(JOB), "--smoke-test", "--output", str(out)], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr
    assert "started a local Ray cluster" in proc.stderr
    # The local cluster serves the state API that Ray Train's placement-group cleaner polls every second.
    assert "State API may be temporarily unavailable" not in proc.stderr, proc.stderr[-2000:]
    # No error line from any process (Ray Train's preemption watcher logged one at its creation), no traceback,
    # and no Ray Train line per report (it repeated the report's raw metrics).
    assert error_lines(proc) == [] and raw_number_lines(proc) == [], proc.stderr[-3000:]
    assert "Reporting training result" not in proc.stderr and "PreemptionWatcher" not in proc.stderr
    # Its output is a pipe, not a terminal: the lines forwarded from the cluster come without colour codes.
    output = proc.stdout + proc.stderr
    assert "(RayTrainWorker pid=" in output and "\x1b[" not in output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 4 and metrics["epochs"] == 1
    assert "depth: 1" in (out / "config.yaml").read_text()
    last = proc.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"test accuracy: formatted \d+\.\d\d after 1 epochs \(4 steps, \d+ samples/s\)", last), last

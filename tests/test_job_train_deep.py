"""jobs/train_deep.py as a user runs it: a real subprocess on the bundled digits."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "jobs" / "train_deep.py"


def run_job(*args, cwd=None):
    return subprocess.run([sys.executable, str(JOB), *args], capture_output=True, text=True, cwd=cwd, timeout=600)


@pytest.mark.slow
def test_job_trains_and_writes_its_outputs(tmp_path):
    cfg = tmp_path / "small.yaml"
    cfg.write_text("model:\n  width: 64\ntrain:\n  log_every: 5\n")
    out = tmp_path / "run"
    proc = run_job(
        "--preset", "paper_mlp", "--trainer", "local", "--config", str(cfg), "--depth", "2", "--epochs", "1", "--max-steps", "12",
        "--format-epochs", "2", "--estimator", "cka", "--sigma", "median", "--output", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "batch 10/31" in proc.stderr  # progress lines while it trains
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 12
    for key in ("test_accuracy_unformatted", "test_accuracy_formatted", "train_seconds", "samples_per_second", "per_layer"):
        assert key in metrics
    assert len(metrics["per_layer"]) == 4
    saved = (out / "config.yaml").read_text()
    assert "width: 64" in saved and "depth: 2" in saved and "estimator: cka" in saved and "sigma: null" in saved
    assert (out / "information_plane.png").stat().st_size > 1000
    assert len((out / "metrics.jsonl").read_text().splitlines()) >= 4


@pytest.mark.parametrize(
    "args, message",
    [
        (["--depth", "0"], "model.depth=0 is invalid"),
        (["--beta", "-3"], "hsic.beta=-3.0 is invalid"),
        (["--dataset", "imagenet"], "data.source='imagenet' is invalid"),
        (["--dataset", "npz:/nonexistent/data.npz"], "/nonexistent/data.npz"),
        (["--config", "/nonexistent/run.yaml"], "does not exist"),
    ],
)
def test_bad_input_is_one_clear_line_and_writes_nothing(tmp_path, args, message):
    out = tmp_path / "run"
    proc = run_job(*args, "--output", str(out))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1]
    assert "Traceback" not in proc.stderr
    assert not out.exists()


def test_unknown_estimator_is_refused_by_the_parser(tmp_path):
    proc = run_job("--estimator", "mine", "--output", str(tmp_path / "run"))
    assert proc.returncode == 2 and "invalid choice: 'mine'" in proc.stderr

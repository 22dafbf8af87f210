"""jobs/train_deep.py as a user runs it: a real subprocess on the bundled digits."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_job_output import error_lines, raw_number_lines

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
        "--preset",
        "paper_mlp",
        "--trainer",
        "local",
        "--config",
        str(cfg),
        "--depth",
        "2",
        "--epochs",
        "1",
        "--max-steps",
        "12",
        "--format-epochs",
        "2",
        "--estimator",
        "cka",
        "--sigma",
        "median",
        "--output",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr
    assert "batch 10/31" in proc.stderr  # progress lines while it trains
    assert error_lines(proc) == [] and raw_number_lines(proc) == [], proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 12
    for key in (
        "test_accuracy_unformatted",
        "test_accuracy_formatted",
        "train_seconds",
        "samples_per_second",
        "per_layer",
    ):
        assert key in metrics
    assert len(metrics["per_layer"]) == 4
    saved = (out / "config.yaml").read_text()
    assert "width: 64" in saved and "depth: 2" in saved and "estimator: cka" in saved and "sigma: null" in saved
    assert (out / "information_plane.png").stat().st_size > 1000
    assert (out / "probes.png").stat().st_size > 1000 and len(metrics["probes"]["test_accuracy"]) == 4
    assert len((out / "metrics.jsonl").read_text().splitlines()) >= 4


def test_bad_input_is_one_clear_line_and_writes_nothing(tmp_path):
    # As a user sees it; which input gets which message is tested in process (tests/test_bad_input.py).
    out = tmp_path / "run"
    proc = run_job("--beta", "-3", "--output", str(out))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "hsic.beta=-3.0 is invalid" in lines[-1]
    assert "Traceback" not in proc.stderr
    assert not out.exists()


def test_unknown_estimator_is_refused_by_the_parser(tmp_path):
    proc = run_job("--estimator", "mine", "--output", str(tmp_path / "run"))
    assert proc.returncode == 2 and "invalid choice: 'mine'" in proc.stderr


def test_a_setting_without_a_dotted_key_is_refused_by_the_parser(tmp_path):
    proc = run_job("depth=3", "--output", str(tmp_path / "run"))
    assert proc.returncode == 2 and "'depth=3' is not KEY=VALUE with a dotted config key" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_impossible_resources_fail_before_any_actor_starts(tmp_path):
    out = tmp_path / "run"
    proc = run_job("--trainer", "ray", "--stages", "3", "--gpus-per-stage", "1", "--output", str(out))
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the run needs more than the cluster has") and "3 GPU" in last
    assert "Traceback" not in proc.stderr and not out.exists()


def test_missing_parquet_directory_is_named(tmp_path):
    proc = run_job("--dataset", f"parquet:{tmp_path}/absent", "--output", str(tmp_path / "run"))
    assert proc.returncode == 2 and f"{tmp_path}/absent" in proc.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_driver_killed_mid_run_resumes_from_its_checkpoint(tmp_path):
    out = tmp_path / "run"
    args = [
        "--trainer",
        "ray",
        "--preset",
        "paper_mlp",
        "--depth",
        "2",
        "--width",
        "256",
        "--epochs",
        "2",
        "--checkpoint-every",
        "10",
        "--checkpoint-seconds",
        "0",
        "--stages",
        "2",
        "--format-epochs",
        "2",
        "--output",
        str(out),
    ]
    first = subprocess.Popen(
        [sys.executable, str(JOB), *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        deadline = time.time() + 300
        latest = out / "checkpoints" / "LATEST"
        while time.time() < deadline and not (latest.exists() and int(latest.read_text()) >= 20):
            time.sleep(0.1)
        assert latest.exists(), "the first run wrote no checkpoint"
        first.send_signal(signal.SIGKILL)  # the driver dies; no clean shutdown, no metrics.json
        first.wait(timeout=30)
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the local Ray cluster the dead driver started
    assert not (out / "metrics.json").exists()
    killed_at = int(latest.read_text())

    # The newest checkpoint damaged: the resume continues from the one before and keeps the damaged files.
    stage = out / "checkpoints" / f"step-{killed_at:08d}" / "stage-001.pt"
    damaged = stage.read_bytes()[:1000]
    stage.write_bytes(damaged)
    proc = run_job(*args, "--resume")
    assert proc.returncode == 0, proc.stderr
    # The damaged checkpoint is a warning, not an error.
    assert error_lines(proc) == [] and raw_number_lines(proc) == [], proc.stderr[-3000:]
    assert (out / "checkpoints" / f"unreadable-step-{killed_at:08d}" / "stage-001.pt").read_bytes() == damaged
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 2 * 31
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    resumes = [r for r in records if r["kind"] == "resume"]
    assert len(resumes) == 1 and resumes[0]["step"] == killed_at - 10 >= 10
    # Steps before the checkpoint were not redone: each logged step number appears once after the resume.
    after = records[records.index(resumes[0]) :]
    assert all(r["step"] > resumes[0]["step"] for r in after if r["kind"] == "step")


@pytest.mark.slow
def test_smoke_test_is_a_tiny_run_and_flags_and_settings_beside_it_win(tmp_path):
    out = tmp_path / "run"
    started = time.perf_counter()
    proc = run_job(
        "--smoke-test",
        "--trainer",
        "local",
        "hsic.eps=1e-4",
        "--width",
        "48",
        "--output",
        str(out),
        "train.cuda_graphs=off",
    )
    assert proc.returncode == 0, proc.stderr
    assert time.perf_counter() - started < 120  # seconds of work; most of it is importing torch
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 4 and len(metrics["per_layer"]) == 3  # depth 1: three HSIC-trained layers
    saved = (out / "config.yaml").read_text()
    assert "width: 48" in saved and "depth: 1" in saved and "eps: 0.0001" in saved and "cuda_graphs: 'off'" in saved
    assert error_lines(proc) == [] and raw_number_lines(proc) == [], proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]  # every accuracy with two decimals
    assert re.fullmatch(r"test accuracy: unformatted \d+\.\d\d, formatted \d+\.\d\d", last), last

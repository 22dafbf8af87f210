"""One writer per run directory (hsic_ray.run.lock): the lock file, its stale takeover, object-store leases,
and two real job processes on one --output."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hsic_ray.errors import RunLockedError
from hsic_ray.run import lock as run_lock
from hsic_ray.run.claim import OutputExistsError, take
from hsic_ray.run.directory import RunDirectory
from hsic_ray.run.lock import LOCK_FILE, RunLock

JOB = Path(__file__).resolve().parents[1] / "jobs" / "train_deep.py"


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_second_claim_is_refused_naming_the_holder_and_the_first_release_frees_it(tmp_path):
    out = tmp_path / "a" / "run"
    first = take(str(out), "hsic")
    holder = json.loads((out / LOCK_FILE).read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    with pytest.raises(RunLockedError, match=f"pid {os.getpid()} on {socket.gethostname()} since "):
        take(str(out), "hsic")
    assert (out / LOCK_FILE).exists()  # the refused claim left the holder's lock alone
    first.release()
    assert not (tmp_path / "a").exists()  # nothing was written: the directories the lock made are gone
    with take(str(out), "hsic") as again:
        assert not again.interrupted
    first.release()  # a second release does nothing


def test_a_refused_claim_releases_the_lock(tmp_path):
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError):
        take(str(tmp_path / "odd"), "hsic")
    assert sorted(p.name for p in (tmp_path / "odd").iterdir()) == ["notes.txt"]


def test_a_lock_of_a_dead_process_is_taken_over_with_one_log_line(tmp_path, caplog):
    out = tmp_path / "run"
    out.mkdir()
    pid = dead_pid()
    stale = {"host": socket.gethostname(), "pid": pid, "since": "2020-01-01T00:00:00", "token": "x"}
    (out / LOCK_FILE).write_text(json.dumps(stale))
    with caplog.at_level("WARNING", logger="hsic_ray"), take(str(out), "hsic"):
        assert json.loads((out / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert [r.message for r in caplog.records if "taking over" in r.message] == [
        f"taking over the lock on {out} from pid {pid} on {stale['host']} since 2020-01-01T00:00:00: "
        "that process no longer runs"
    ]
    assert not (out / LOCK_FILE).exists()


def test_a_lock_of_a_live_process_or_another_host_is_not_taken_over(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = {"host": socket.gethostname(), "pid": sleeper.pid, "since": "now", "token": "x"}
        (out / LOCK_FILE).write_text(json.dumps(live))
        with pytest.raises(RunLockedError, match=f"pid {sleeper.pid}"):
            take(str(out), "hsic")
    finally:
        sleeper.kill()
        sleeper.wait()
    elsewhere = {"host": "another-host", "pid": dead_pid(), "since": "now", "token": "x"}
    (out / LOCK_FILE).write_text(json.dumps(elsewhere))
    with pytest.raises(RunLockedError, match="on another-host"):
        take(str(out), "hsic")


def test_an_object_store_lease_refuses_a_second_holder_and_an_expired_one_is_taken_over(monkeypatch):
    monkeypatch.setattr(run_lock, "LEASE_SETTLE_SECONDS", 0.01)
    run = RunDirectory("mock:///runs/a")  # pyarrow's in-memory filesystem stands in for a bucket
    first = RunLock.acquire(run)
    assert first.lease and json.loads(run.read_text(LOCK_FILE))["expires"] > time.time()
    with pytest.raises(RunLockedError, match=f"pid {os.getpid()}"):
        RunLock.acquire(run)
    first.release()
    assert not run.exists(LOCK_FILE)
    expired = {"host": "another-host", "pid": 1, "since": "then", "token": "x", "expires": time.time() - 1}
    run.write_text(LOCK_FILE, json.dumps(expired))
    with RunLock.acquire(run) as second:
        assert json.loads(run.read_text(LOCK_FILE))["token"] == second.holder.token
    live = {**expired, "expires": time.time() + 60}
    run.write_text(LOCK_FILE, json.dumps(live))
    with pytest.raises(RunLockedError, match="on another-host"):
        RunLock.acquire(run)


def _job_args(out: Path) -> list[str]:
    return [sys.executable, str(JOB), "--smoke-test", "--trainer", "local", "--output", str(out)]


def _job(out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([*_job_args(out), *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_two_jobs_on_one_output_the_second_is_refused_and_a_killed_one_is_taken_over(tmp_path):
    out = tmp_path / "run"
    # Runs until killed: a job that could end by itself might release the lock while the second starts.
    first = _job(out, "--epochs", "1000", "train.max_steps=null", "--batch-size", "32", "train.probe_samples=0")
    try:
        deadline = time.monotonic() + 60
        while not (out / "config.yaml").exists():
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.1)
        before = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != "metrics.jsonl"}
        started = time.monotonic()
        second = subprocess.run(_job_args(out), capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr
        lines = second.stderr.strip().splitlines()
        assert lines[-1].startswith("error: ") and f"pid {first.pid} on {socket.gethostname()}" in lines[-1]
        assert "Traceback" not in second.stderr
        assert time.monotonic() - started < 60
        assert first.poll() is None
        after = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name in before}
        assert after == before  # the refused run touched none of the first's files
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert not [r for r in records if r["kind"] == "restart"]
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # SIGKILL left the lock behind: the same command takes it over and continues the run.
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == first.pid
    rerun = subprocess.run(
        [*_job_args(out), "--max-steps", "2", "--batch-size", "32", "train.probe_samples=0"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert rerun.returncode == 0, rerun.stderr
    assert f"taking over the lock on {out} from pid {first.pid}" in rerun.stderr
    assert (out / "metrics.json").exists() and not (out / LOCK_FILE).exists()

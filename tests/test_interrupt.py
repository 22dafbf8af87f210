"""SIGINT and SIGTERM to real job processes: one line, exit 130 / 143, no traceback, a checkpoint at the stop,
and the same command continues the run to the result an uninterrupted run reaches (hsic_ray.interrupt)."""

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from hsic_ray.run.lock import LOCK_FILE

JOBS = Path(__file__).resolve().parents[1] / "jobs"
# Many small steps, so that a signal lands mid-run (60 of them took 0.2 s: a test descheduled that long saw the
# run end first); no probes or BatchNorm calibration to wait for.
HSIC_STEPS = 750
HSIC_RUN = [
    "--smoke-test",
    "--trainer",
    "local",
    "--batch-size",
    "32",
    "--epochs",
    "3",
    "train.max_steps=null",
    "--log-every",
    "1",
    "train.probe_samples=0",
    "train.bn_calibration_batches=0",
]


def start_job(script: str, out: Path, args: list[str]) -> subprocess.Popen:
    command = [sys.executable, str(JOBS / script), *args, "--output", str(out)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(condition, proc: subprocess.Popen | None, timeout: float = 90.0) -> None:
    """Until `condition()` holds, while `proc` (if given) still runs."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc is None or proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the job did not get there in time"
        time.sleep(0.05)


def steps_logged(out: Path) -> int:
    path = out / "metrics.jsonl"
    if not path.exists():
        return 0
    return sum('"kind": "step"' in line for line in path.read_text().splitlines())


def run_to_end(script: str, out: Path, args: list[str]) -> subprocess.CompletedProcess:
    command = [sys.executable, str(JOBS / script), *args, "--output", str(out)]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def interrupt_hsic_run(out: Path, signum: int, code: int, trainer: str = "local") -> int:
    """Start the HSIC job, signal it mid-run, check how it stopped; returns the step it stopped at."""
    proc = start_job("train_deep.py", out, [*HSIC_RUN, "--trainer", trainer])
    wait_for(lambda: steps_logged(out) >= 5, proc)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    interrupt_lines = [line for line in stderr.splitlines() if "interrupted" in line]
    assert len(interrupt_lines) == 1 and stderr.strip().splitlines()[-1] == interrupt_lines[0]
    step = int(interrupt_lines[0].split("interrupted at step ")[1].split(";")[0])
    assert interrupt_lines[0] == f"interrupted at step {step}; rerun the same command to continue"
    assert 5 <= step < HSIC_STEPS
    # The stop wrote a checkpoint of every step taken, and released the output's lock.
    assert (out / "checkpoints" / f"step-{step:08d}" / "MANIFEST.json").exists()
    assert not (out / LOCK_FILE).exists() and not (out / "metrics.json").exists()
    return step


@pytest.mark.slow
@pytest.mark.parametrize("trainer", ["local", "ray"])
def test_sigterm_stops_an_hsic_run_with_exit_143_after_a_checkpoint(tmp_path, trainer):
    interrupt_hsic_run(tmp_path / "run", signal.SIGTERM, 143, trainer)


@pytest.mark.slow
def test_sigint_stops_an_hsic_run_and_the_same_command_reaches_the_uninterrupted_result(tmp_path):
    out = tmp_path / "run"
    step = interrupt_hsic_run(out, signal.SIGINT, 130)
    resumed = run_to_end("train_deep.py", out, HSIC_RUN)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from the checkpoint at step {step}" in resumed.stderr
    uninterrupted = run_to_end("train_deep.py", tmp_path / "whole", HSIC_RUN)
    assert uninterrupted.returncode == 0, uninterrupted.stderr
    ours, theirs = (json.loads((d / "metrics.json").read_text()) for d in (out, tmp_path / "whole"))
    assert ours["steps"] == theirs["steps"] == HSIC_STEPS
    for key in ("test_accuracy_unformatted", "test_accuracy_formatted", "test_accuracy_least_squares"):
        assert ours.get(key) == theirs.get(key), key


@pytest.mark.slow
def test_a_second_sigint_stops_at_once_in_one_line(tmp_path):
    out = tmp_path / "run"
    proc = start_job("train_deep.py", out, HSIC_RUN)
    wait_for(lambda: (out / "config.yaml").exists(), proc)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert [line for line in stderr.splitlines() if "interrupted" in line] == [stderr.strip().splitlines()[-1]]
    assert not (out / LOCK_FILE).exists()


STARTING = """
import subprocess, time
from hsic_ray import interrupt

with interrupt.signals_stop_the_run(), interrupt.exits_at_once():
    # A child that nothing ties to this process, as a Ray process forked an instant before the signal is.
    child = subprocess.Popen(["sleep", "600"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    print(child.pid, flush=True)
    time.sleep(600)
"""


def test_a_signal_during_start_up_ends_the_processes_the_job_started():
    proc = subprocess.Popen([sys.executable, "-c", STARTING], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    child = psutil.Process(int(proc.stdout.readline()))
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130 and stderr.strip() == "interrupted; rerun the same command to continue"
    try:
        wait_for(lambda: _ended(child), None, timeout=10)
    except AssertionError:
        child.kill()
        pytest.fail("the process the job started outlived it")


def _named(processes: list[psutil.Process]) -> list[tuple[psutil.Process, str]]:
    """Each process with its name, leaving out those that ended meanwhile."""
    named = []
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            named.append((process, process.name()))
    return named


def _ended(process: psutil.Process) -> bool:
    """Gone, or a zombie that whichever process adopted it has not reaped yet."""
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.slow
def test_ctrl_c_while_a_ray_job_starts_is_one_line_and_leaves_no_process(tmp_path):
    ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # the job's own: short, for Ray's socket paths
    command = [sys.executable, str(JOBS / "train_deep.py"), "--smoke-test", "--output", str(tmp_path / "run")]
    env = {**os.environ, "RAY_TMPDIR": ray_tmp}
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        # As soon as Ray begins to start (its session directory), while the job imports torch beside it.
        wait_for(lambda: list(Path(ray_tmp).glob("ray/session_*")), proc, timeout=120)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 130, stderr
        lines = stderr.strip().splitlines()
        assert lines[-1] == "interrupted; rerun the same command to continue"
        # Nothing else but the job's own progress lines: no traceback, no library's notes at exit.
        assert [line for line in lines[:-1] if not re.match(r"\d\d:\d\d:\d\d (started|run )", line)] == []
        # Ray's processes notice their driver's end by polling, slowly on a loaded machine (the whole suite in
        # parallel on 2 cores: docs/results.md, "Fresh runs").
        try:
            wait_for(lambda: not _cluster_processes(ray_tmp), None, timeout=60)
        except AssertionError as failure:
            raise AssertionError(f"Ray's processes outlived the job: {_cluster_processes(ray_tmp)}") from failure
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.slow
def test_a_job_that_started_ray_exits_with_its_code_and_leaves_no_process(tmp_path):
    ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    script = (
        "import ray\n"
        "from hsic_ray.cli import exit_job\n"
        "ray.init(address='local', num_cpus=1, include_dashboard=False)\n"
        "print('started', flush=True)\n"
        "exit_job(3)\n"
    )
    env = {**os.environ, "RAY_TMPDIR": ray_tmp}
    try:
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
        assert proc.returncode == 3 and proc.stdout == "started\n", proc.stderr
        # exit_job shut Ray down itself: every process of its cluster is gone once the job has exited.
        assert list(Path(ray_tmp).glob("ray/session_*"))
        wait_for(lambda: not _cluster_processes(ray_tmp), None, timeout=10)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _cluster_processes(ray_tmp: str) -> list[str]:
    """The command lines of the Ray cluster's processes whose files are under `ray_tmp`."""
    lines = []
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if any(ray_tmp in arg for arg in process.cmdline()):
                lines.append(" ".join(process.cmdline())[:120])
    return lines


RAY_NODE_AGENTS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")
# Short epochs: enough of them that the kill, after the second, lands mid-run.
BACKPROP_EPOCHS = 20
BACKPROP_RUN = ["--smoke-test", "--epochs", str(BACKPROP_EPOCHS), "train.max_steps=null", "--batch-size", "1000"]


def checkpoints(out: Path) -> dict[str, bytes]:
    storage = out / "ray_train" / "backprop"
    if not storage.is_dir():
        return {}
    found = {}
    for path in storage.glob("checkpoint_*/state.pt"):
        try:
            found[path.parent.name] = path.read_bytes()
        except FileNotFoundError:  # being moved into place
            continue
    return found


@pytest.mark.slow
def test_a_killed_backprop_run_resumes_from_its_checkpoint_without_the_snapshot_and_keeps_its_bytes(tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, str(JOBS / "train_backprop.py"), *BACKPROP_RUN, "--output", str(out)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: any(name.startswith("checkpoint_epoch00002") for name in checkpoints(out)), proc, 240)
    # Its Ray cluster and Ray Train's workers; not Ray's node agents, which write nothing of the run and outlive
    # a killed driver by up to a minute, waiting out their own timeouts.
    started = {
        p: name for p, name in _named(psutil.Process(proc.pid).children(recursive=True)) if name not in RAY_NODE_AGENTS
    }
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    # Without its driver, the workers stop: they end, so no checkpoint can appear after.
    try:
        wait_for(lambda: all(_ended(process) for process in started), None, timeout=60)
    except AssertionError:
        pytest.fail(f"outlived the killed driver: {[name for p, name in started.items() if not _ended(p)]}")
    first = checkpoints(out)
    assert not [name for name in first if name.startswith(f"checkpoint_epoch{BACKPROP_EPOCHS:05d}")]  # stopped mid-run
    (out / "ray_train" / "backprop" / "checkpoint_manager_snapshot.json").unlink(missing_ok=True)
    by_age = sorted(first, key=lambda name: int(name.split("_step")[1].split("_")[0]))
    assert len(by_age) >= 2, by_age
    damaged, newest = by_age[-1], by_age[-2]  # the newest is damaged: the run goes on from the one before
    first[damaged] = first[damaged][: len(first[damaged]) // 2]
    (out / "ray_train" / "backprop" / damaged / "state.pt").write_bytes(first[damaged])

    rerun = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["resumed_from"] and metrics["epochs"] == BACKPROP_EPOCHS
    epoch = int(newest.split("checkpoint_epoch")[1].split("_")[0])
    assert metrics["resumed_from"][0]["epoch"] == epoch
    for name, data in first.items():  # no checkpoint of the first attempt was written over
        path = out / "ray_train" / "backprop" / name / "state.pt"
        assert not path.exists() or path.read_bytes() == data, name
    assert any(name.endswith("_attempt1") for name in checkpoints(out))
    # The damaged checkpoint is kept, byte for byte, where neither Ray Train's rotation nor a resume looks.
    assert (out / "ray_train" / f"unreadable-{damaged}" / "state.pt").read_bytes() == first[damaged]
    assert f"Ray Train checkpoint {damaged} cannot be loaded" in rerun.stderr


WORKER_EXIT = """
import sys, weakref
from hsic_ray import interrupt

class Thing:
    pass

def collected_with(exc):
    def callback(ref):
        raise exc
    thing = Thing()
    ref = weakref.ref(thing, callback)
    del thing  # the callback runs here, where Python cannot raise: an unraisable exception
    return ref

if sys.argv[1] == "quiet":
    interrupt.worker_exits_quietly()
    interrupt.worker_exits_quietly()  # a second call wraps nothing twice
collected_with(SystemExit(1))  # as Ray's SIGTERM handler raises it when it stops a worker
collected_with(ValueError("a real one"))
print("still running", flush=True)
"""


@pytest.mark.parametrize("mode", ["quiet", "default"])
def test_a_worker_stopped_inside_a_callback_prints_no_traceback_and_real_errors_still_show(mode):
    proc = subprocess.run([sys.executable, "-c", WORKER_EXIT, mode], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout == "still running\n", proc.stderr
    assert "ValueError: a real one" in proc.stderr
    assert ("SystemExit" in proc.stderr) == (mode == "default")  # what a stopped worker printed before
    assert proc.stderr.count("Exception ignored") == (1 if mode == "quiet" else 2)

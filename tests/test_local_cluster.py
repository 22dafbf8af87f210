"""`ray start --head` on one machine, then the job script and `ray job submit`, under Ray 2.60's token
authentication (what `ray start` turns on by default) and with it disabled."""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from ray._common.utils import get_ray_address_file

# The tests of one auth mode share a head (its fixture): they run on one pytest-xdist worker.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("local_cluster")]

ROOT = Path(__file__).resolve().parents[1]
SMALL_RUN = [
    "--trainer",
    "ray",
    "--preset",
    "paper_mlp",
    "--depth",
    "1",
    "--width",
    "64",
    "--epochs",
    "1",
    "--max-steps",
    "8",
    "--format-epochs",
    "1",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", params=["token", "disabled"])
def head(request):
    """A two-GPU (logical) head node started with `ray start --block`, stopped with its process group; the
    tests of one auth mode share it, as jobs share a user's cluster."""
    # No RAY_ADDRESS (conftest's "local"): the job looks for the cluster that `ray start` started, by the address
    # file it writes in this test process's RAY_TMPDIR.
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    env["RAY_AUTH_MODE"] = request.param  # what the README asks of every shell that runs `ray ...`
    dashboard = free_port()
    options = [
        f"--dashboard-port={dashboard}",
        # Any free port for the job agent: Ray's default (52365) may be another cluster's on this machine, and
        # an agent that cannot bind it serves no jobs.
        "--dashboard-agent-listen-port=0",
        "--num-cpus=4",
        "--num-gpus=2",
        "--include-dashboard=true",
    ]
    with running_head(env, options, ready=lambda status: "2.0 GPU" in status) as address:
        yield {"env": env, "address": address, "dashboard": f"http://127.0.0.1:{dashboard}", "mode": request.param}


@contextlib.contextmanager
def running_head(
    env: dict[str, str],
    options: list[str],
    ready: Callable[[str], bool],
    start_env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> Iterator[str]:
    """`ray start --head --block` with `options` on free ports, its address once `ray status` answers and
    `ready(its output)` holds (within 90 s); stopped with its process group afterwards. `start_env`: the head's
    own environment, where it differs from the clients' `env`."""
    port = free_port()
    log = tempfile.TemporaryFile(mode="w+")  # the head's own output, for a failure to show
    proc = subprocess.Popen(
        [
            "ray",
            "start",
            "--head",
            "--block",
            f"--port={port}",
            f"--ray-client-server-port={free_port()}",  # not Ray's fixed 10001, which another head may hold
            "--disable-usage-stats",
            *options,
        ],
        env=start_env or env,
        cwd=cwd,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            status = subprocess.run(["ray", "status", "--address", address], env=env, capture_output=True, text=True)
            if status.returncode == 0 and ready(status.stdout):
                break
            if time.time() > deadline or proc.poll() is not None:
                log.seek(0)
                pytest.fail(
                    f"ray start did not come up (exit code {proc.poll()}): {status.stderr[-1000:]}\n"
                    f"its output: {log.read()[-2000:]}"
                )
            time.sleep(1)
        yield address
    finally:
        stop_head(proc, port)
        log.close()


def stop_head(proc: subprocess.Popen, port: int) -> None:
    """Stop a `ray start --block` head and its process group, whether or not they already ended."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGINT)  # `ray start --block` stops its cluster on Ctrl-C
    try:
        proc.wait(timeout=3)
    except subprocess.TimeoutExpired:
        pass  # it often hangs after running jobs; the SIGKILL below ends it
    finally:
        with contextlib.suppress(ProcessLookupError):  # nothing of that cluster left to end
            os.killpg(proc.pid, signal.SIGKILL)  # anything of that cluster still running
        # `ray stop` would also drop the address file pointing at this cluster (in this process's RAY_TMPDIR).
        current = Path(get_ray_address_file(None))
        if current.exists() and current.read_text().strip().endswith(f":{port}"):
            current.unlink()


# README and docs/clusters.md: before the first `ray job submit` to a cluster just started, wait until the
# head's job agent takes jobs (the dashboard answers before it does, and refuses jobs until then).
WAIT_FOR_JOB_AGENT = "timeout 120 sh -c 'until ray job submit -- true >/dev/null 2>&1; do sleep 2; done'"


def wait_for_job_agent(head) -> None:
    """The documented one-liner, run as a user runs it (its address from RAY_ADDRESS, as Ray's CLI takes it)."""
    for doc in ("README.md", "docs/clusters.md"):
        assert WAIT_FOR_JOB_AGENT in (ROOT / doc).read_text(), f"{doc} does not show the wait for the job agent"
    env = {**head["env"], "RAY_ADDRESS": head["dashboard"]}
    started = time.monotonic()
    proc = subprocess.run(["sh", "-c", WAIT_FOR_JOB_AGENT], env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"the job agent did not take a job within {time.monotonic() - started:.0f} s"


def run_job_script(out: Path, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    command = [sys.executable, str(ROOT / "jobs" / "train_deep.py"), *SMALL_RUN, "--output", str(out)]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def test_job_script_finds_the_running_cluster_with_one_stage_per_gpu(head, tmp_path):
    out = tmp_path / "run"
    env = dict(head["env"])
    if head["mode"] == "token":
        del env["RAY_AUTH_MODE"]  # the job copes without the setting: it uses the token `ray start` wrote
    proc = run_job_script(out, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "connected to the Ray cluster running on this machine" in proc.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    placements = json.loads((out / "placements.json").read_text())
    assert metrics["stages"] == 2 and sorted(g for p in placements for g in p["gpu_ids"]) == ["0", "1"]


def test_a_refused_token_is_one_line_at_once(head, tmp_path):
    if head["mode"] != "token":
        pytest.skip("a cluster without authentication refuses no one")
    out = tmp_path / "run"
    env = {**head["env"], "RAY_AUTH_MODE": "disabled"}  # the shell forgot the README's export
    started = time.monotonic()
    proc = run_job_script(out, env, timeout=120)
    assert proc.returncode == 2 and time.monotonic() - started < 30, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the Ray cluster at ") and "refused this process's authentication" in last
    assert "RAY_AUTH_MODE" in last and "Traceback" not in proc.stderr
    # Ray's own client logs the refusal once (it retried for 20 s, twenty lines, before the job asked first).
    assert proc.stderr.count("InvalidAuthToken") <= 1
    assert not out.exists()


def test_ray_job_submit_runs_the_job_on_the_cluster(head, tmp_path):
    wait_for_job_agent(head)
    out = tmp_path / "run"
    proc = subprocess.run(
        [
            "ray",
            "job",
            "submit",
            "--address",
            head["dashboard"],
            "--working-dir",
            str(ROOT),
            "--",
            "python",
            "jobs/train_deep.py",
            *SMALL_RUN,
            "--output",
            str(out),
        ],
        env=head["env"],
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "succeeded" in proc.stdout
    assert json.loads((out / "metrics.json").read_text())["stages"] == 2

"""How a job starts its run: Ray in the background where the stage count is known early, and a quick exit."""

import subprocess
import sys
import textwrap

import pytest

from hsic_ray.config import build_config
from hsic_ray.distributed.background_connect import BackgroundConnection
from hsic_ray.errors import ClusterConnectionError
from hsic_ray.launch import connects_early


def test_ray_starts_early_only_where_the_stage_count_is_known_before_the_run_checks(tmp_path):
    fresh = build_config(overrides={"output": str(tmp_path / "new")})
    assert connects_early(fresh, resume=False)
    assert connects_early(build_config(), resume=False)  # no output given: a new timestamped directory
    assert not connects_early(fresh, resume=True)
    assert not connects_early(build_config(overrides={"trainer": "local"}), resume=False)
    assert not connects_early(build_config(overrides={"output": str(tmp_path)}), resume=False)  # may hold a run
    assert not connects_early(build_config(overrides={"output": "s3://bucket/run"}), resume=False)
    given = build_config(overrides={"output": str(tmp_path), "ray.stages": 2})
    assert connects_early(given, resume=False)  # a checkpoint with other stages is refused either way


def test_a_failed_background_connection_raises_in_the_waiting_thread():
    ray_cfg = build_config(overrides={"ray.address": "127.0.0.1:9"}).ray  # nothing listens on port 9
    connection = BackgroundConnection.start(ray_cfg)
    with pytest.raises(ClusterConnectionError, match="nothing answers at 127.0.0.1:9"):
        connection.wait()


def test_exit_job_ends_threads_runs_exit_handlers_flushes_and_keeps_the_code(tmp_path):
    script = textwrap.dedent(
        f"""
        import atexit, concurrent.futures, pathlib, sys, threading, time
        from hsic_ray.cli import exit_job
        out = pathlib.Path({str(tmp_path)!r})
        atexit.register(lambda: (out / "handler").write_text("ran"))
        threading.Thread(target=lambda: (time.sleep(0.5), (out / "thread").write_text("done"))).start()
        concurrent.futures.ThreadPoolExecutor(1).submit(int).result()  # its idle worker thread stays behind
        print("last words", end="")
        exit_job(3)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 3, done.stderr
    assert done.stdout == "last words"
    assert (tmp_path / "handler").read_text() == "ran"
    assert (tmp_path / "thread").read_text() == "done"

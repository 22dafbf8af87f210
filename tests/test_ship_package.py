"""ray.ship_package: joining a cluster whose workers cannot import hsic_ray, the job ships the package
(runtime_env py_modules) and its stage actors import the shipped copy."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_local_cluster import running_head

from hsic_ray.distributed.connect import PACKAGE_DIR, package_runtime_env

ROOT = Path(__file__).resolve().parents[1]
# Run in a driver process of its own (a fresh ray.init), from a directory without hsic_ray in it.
PROBE = """
import sys, ray
from hsic_ray.distributed.connect import connect
connect(sys.argv[1], local_cpus=1, ship_package=sys.argv[2] == "ship")

@ray.remote(num_cpus=1)
def where():
    import hsic_ray
    return hsic_ray.__file__

try:
    print("IMPORTED", ray.get(where.remote()))
except Exception as exc:
    print("FAILED", str(exc).strip().splitlines()[-1])
"""


@pytest.fixture
def cluster_without_hsic_ray(tmp_path):
    """`ray start --head` whose workers import a stand-in hsic_ray that fails, as on a node where the package
    is not installed (this environment's editable install makes the real one importable everywhere, but
    PYTHONPATH comes first)."""
    shadow = tmp_path / "shadow" / "hsic_ray"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('hsic_ray is not installed on this node')\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONPATH")}  # the address is given
    env["RAY_AUTH_MODE"] = "disabled"
    options = ["--num-cpus=3", "--include-dashboard=false"]
    start_env = {**env, "PYTHONPATH": str(tmp_path / "shadow")}
    # Up once its node has registered, not when the GCS first answers `ray status`.
    with running_head(
        env, options, ready=lambda status: "3.0 CPU" in status, start_env=start_env, cwd=tmp_path
    ) as address:
        # The drivers import this checkout's hsic_ray (PYTHONPATH) and run from a directory without one.
        work = tmp_path / "work"
        work.mkdir()
        yield {"address": address, "env": {**env, "PYTHONPATH": str(ROOT)}, "cwd": work}


def probe(cluster, mode: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, cluster["address"], mode],
        env=cluster["env"],
        cwd=cluster["cwd"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1]


@pytest.mark.slow
def test_workers_import_the_shipped_package_and_a_job_trains_on_them(cluster_without_hsic_ray):
    cluster = cluster_without_hsic_ray
    # Without shipping, the cluster's workers have no usable hsic_ray: the setup this test needs.
    assert probe(cluster, "no") == "FAILED ImportError: hsic_ray is not installed on this node"
    # Shipped: the workers import the driver's package from Ray's runtime resources.
    line = probe(cluster, "ship")
    assert line.startswith("IMPORTED ") and "runtime_resources" in line and "py_modules" in line
    assert line.endswith("hsic_ray/__init__.py") and str(ROOT) not in line

    # A whole job: two stage actors on those workers train and report.
    out = cluster["cwd"] / "run"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "jobs" / "train_deep.py"),
            "--smoke-test",
            "--trainer",
            "ray",
            "--stages",
            "2",
            "--ray-address",
            cluster["address"],
            "--output",
            str(out),
        ],
        env=cluster["env"],
        cwd=cluster["cwd"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "metrics.json").read_text())["stages"] == 2 and (out / "model.pt").is_file()


def test_the_package_joins_a_submitted_jobs_runtime_env_unless_it_ships_modules_itself(monkeypatch):
    assert Path(PACKAGE_DIR) == ROOT / "hsic_ray"
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert package_runtime_env() == {"py_modules": [PACKAGE_DIR]}
    # `ray job submit --working-dir .`: Ray merges the two (different fields).
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {"working_dir": "/x"}}))
    assert package_runtime_env() == {"py_modules": [PACKAGE_DIR]}
    # A job shipping py_modules of its own: Ray cannot merge two lists, so that job's wins.
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {"py_modules": ["/x/mine"]}}))
    assert package_runtime_env() is None

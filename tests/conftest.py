"""Session settings for every test process (each pytest-xdist worker is one), set before anything imports Ray:

- RAY_ADDRESS=local: a job or ray.init() without an address starts a new local cluster of its own, never
  joining one that runs on this machine (another test's, another worker's, a user's). Tests that join a
  cluster give its address, or drop the variable from their subprocess's environment.
- RAY_TMPDIR: this process's own Ray temporary directory (sessions, logs, sockets, and the address file
  `ray start` writes, which `--ray-address auto` and a job without an address look up), deleted at the end.
- One torch thread per process (OMP_NUM_THREADS=1) unless a test or the code sets its own: the workers and
  their Ray clusters already keep every core busy, and a torch process with a thread per core then spends
  its time waiting for its descheduled threads (docs/results.md, "One torch thread per test process").
- A smaller object store per cluster (a tenth of free memory instead of Ray's 30 %): several clusters run
  at once here, and no test puts much in it.

In parallel (scripts/test.sh: pytest-xdist, `--dist loadgroup`), each test goes to any worker, except the
modules marked `pytest.mark.xdist_group`, whose tests share one cluster and stay on one worker. Slow tests are
handed out first, so that the longest ones do not start last and hold the run up.
"""

import os
import shutil
import sys
import tempfile

os.environ["RAY_ADDRESS"] = "local"
os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths live there
os.environ["OMP_NUM_THREADS"] = "1"
os.environ.setdefault("RAY_DEFAULT_OBJECT_STORE_MEMORY_PROPORTION", "0.1")

import pytest  # noqa: E402

from hsic_ray.config import build_config  # noqa: E402
from hsic_ray.data import ImageData, load_dataset  # noqa: E402


@pytest.fixture(scope="session")
def digits():
    """A quarter of the bundled real digits (the package's own split): quick enough for many small runs."""
    full = load_dataset(build_config().data)
    return ImageData(
        "mnist-sample", full.x_train[:2000], full.y_train[:2000], full.x_test[:1000], full.y_test[:1000], 10
    )


@pytest.fixture(scope="session")
def all_digits():
    return load_dataset(build_config().data)


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: files keep their order


def pytest_unconfigure(config):
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        from hsic_ray.distributed.shutdown import shutdown

        shutdown()  # before its session directory goes
    shutil.rmtree(os.environ["RAY_TMPDIR"], ignore_errors=True)

"""Which cluster connect() picks, without starting one: Ray's calls are recorded, not made."""

import io

import pytest

from hsic_ray.distributed import connect as connect_module
from hsic_ray.distributed.connect import (
    COLOR_PREFIX,
    ClusterConnectionError,
    check_address,
    connect,
    plain_log_prefixes_off_a_terminal,
    started_cluster_address,
)


@pytest.fixture
def calls(monkeypatch):
    """ray.init and the join recorded; this machine's `ray start` cluster at 10.0.0.1:6379 ("running")."""
    made = []
    monkeypatch.setattr(connect_module.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(connect_module.ray, "init", lambda **kw: made.append(("init", kw["address"])))
    monkeypatch.setattr(connect_module, "_join", lambda address, ship: made.append(("join", address)))
    monkeypatch.setattr(connect_module, "started_cluster_address", lambda: "10.0.0.1:6379")
    monkeypatch.setattr(connect_module, "check_local_cluster", lambda *args: None)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return made


def test_local_always_starts_a_new_cluster_even_beside_a_running_one(calls, monkeypatch):
    connect("local", local_cpus=1)
    monkeypatch.setenv("RAY_ADDRESS", "local")
    connect(None, local_cpus=1)
    assert calls == [("init", "local"), ("init", "local")]


def test_no_address_or_auto_joins_the_cluster_ray_start_started(calls):
    connect(None, local_cpus=1)
    connect("auto", local_cpus=1)
    assert calls == [("join", "10.0.0.1:6379"), ("join", "10.0.0.1:6379")]


def test_no_address_without_a_started_cluster_starts_a_new_one(calls, monkeypatch):
    monkeypatch.setattr(connect_module, "started_cluster_address", lambda: None)
    connect(None, local_cpus=1)
    assert calls == [("init", "local")]
    with pytest.raises(ClusterConnectionError, match="no Ray cluster runs on this machine"):
        check_address("auto")
    check_address("local")  # nothing to check: a new cluster


def test_the_started_cluster_is_the_one_in_ray_tmpdir_and_only_while_its_gcs_runs(tmp_path, monkeypatch):
    import ray._private.services as services

    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    monkeypatch.setattr(services, "find_gcs_addresses", lambda: frozenset({"10.0.0.1:6379"}))
    assert started_cluster_address() is None  # no `ray start` recorded
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text("10.0.0.2:6379\n")
    assert started_cluster_address() is None  # recorded, but that cluster's GCS is gone (no `ray stop`)
    (tmp_path / "ray" / "ray_current_cluster").write_text("10.0.0.1:6379\n")
    assert started_cluster_address() == "10.0.0.1:6379"


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(
    "stdout, stderr, no_color, colored",
    [
        (Terminal(), Terminal(), None, True),
        (Terminal(), Terminal(), "1", False),  # no-color.org
        (Terminal(), io.StringIO(), None, False),  # stderr to a file
        (io.StringIO(), Terminal(), None, False),
    ],
)
def test_ray_colours_its_log_prefixes_only_on_a_terminal(monkeypatch, stdout, stderr, no_color, colored):
    monkeypatch.delenv(COLOR_PREFIX, raising=False)
    monkeypatch.delenv("NO_COLOR", raising=False)
    if no_color:
        monkeypatch.setenv("NO_COLOR", no_color)
    monkeypatch.setattr(connect_module.sys, "stdout", stdout)
    monkeypatch.setattr(connect_module.sys, "stderr", stderr)
    plain_log_prefixes_off_a_terminal()
    assert (COLOR_PREFIX not in connect_module.os.environ) == colored
    if not colored:
        assert connect_module.os.environ[COLOR_PREFIX] == "0"


def test_an_explicit_ray_color_prefix_wins(monkeypatch):
    monkeypatch.setenv(COLOR_PREFIX, "1")
    monkeypatch.setattr(connect_module.sys, "stdout", io.StringIO())
    plain_log_prefixes_off_a_terminal()
    assert connect_module.os.environ[COLOR_PREFIX] == "1"

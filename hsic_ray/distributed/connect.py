"""Finding the Ray cluster to run on: the one given, the one `ray start` started here, or a fresh local one.

Ray 2.60 turns token authentication on by default when `ray start` or `ray.init()` starts a cluster, but
its command-line clients (`ray status`, `ray job submit`) default to no authentication: with
RAY_AUTH_MODE unset they cannot talk to a cluster that `ray start` started. Users set RAY_AUTH_MODE=token
(or disabled) in every shell that runs `ray ...`; this module makes the job itself work either way.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import threading
from collections.abc import Iterator
from typing import Any

import ray

from hsic_ray import interrupt
from hsic_ray.config import RayConfig, is_ray_address
from hsic_ray.errors import ClusterConnectionError
from hsic_ray.machine import check_local_cluster

log = logging.getLogger("hsic_ray")

CONNECT_TIMEOUT_S = 10.0  # for the head's port to accept; Ray itself retries a dead address for minutes
GCS_TIMEOUT_S = 20.0  # for the head's GCS to answer once the port accepts
COLOR_PREFIX = "RAY_COLOR_PREFIX"  # read by the driver each time it prints a line from the cluster


def plain_log_prefixes_off_a_terminal() -> None:
    """Ray colours the `(StageActor pid=...)` prefix of every line it forwards from the cluster's processes,
    wherever the driver's output goes: in a log file, or what `ray job logs` shows, that is escape codes.
    Colour only where both streams are terminals and NO_COLOR (no-color.org) is unset, as command-line tools
    do. An explicit RAY_COLOR_PREFIX always wins."""
    if COLOR_PREFIX in os.environ:
        return
    if os.environ.get("NO_COLOR") or not (sys.stdout.isatty() and sys.stderr.isatty()):
        os.environ[COLOR_PREFIX] = "0"


def default_auth_mode() -> None:
    """With RAY_AUTH_MODE unset and a Ray token on this machine, use token mode to reach the cluster, as a
    cluster started here by `ray start` expects. An explicit RAY_AUTH_MODE always wins."""
    try:  # Ray's own rule for its CLI; it also refreshes Ray's cached config, which reads the mode once
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )
    except ImportError:  # a Ray without token authentication
        return
    with _quiet_token_notice():
        maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


@contextlib.contextmanager
def _quiet_token_notice() -> Iterator[None]:
    """Ray logs a warning each time it turns token authentication on by default (using the token on this
    machine, or for a new local cluster): what a cluster started here expects, so a job says nothing of it.
    Its errors still show."""
    notices = logging.getLogger("ray._private.authentication.authentication_token_setup")
    level = notices.level
    notices.setLevel(logging.ERROR)
    try:
        yield
    finally:
        notices.setLevel(level)


# The hsic_ray package directory this process imported: what stage actors and trial workers must import too.
PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SUBMITTED_JOB_CONFIG = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by `ray job submit` (ray._private.runtime_env.constants)
_API_SERVER_ADDRESS = "RAY_API_SERVER_ADDRESS"  # where Ray's state API clients look first for the dashboard


def package_runtime_env() -> dict[str, Any] | None:
    """A runtime_env that ships this process's hsic_ray package to every worker of the job, so a cluster
    whose nodes lack it (or hold another version) runs the driver's code: Ray zips the directory once,
    uploads it to the cluster and puts it first on each worker's path. Ray merges it with the runtime_env
    of a submitted job (`ray job submit --working-dir ...`); a job that already ships py_modules of its own
    is left as it is (Ray refuses to merge two py_modules lists)."""
    submitted = json.loads(os.environ.get(_SUBMITTED_JOB_CONFIG) or "{}").get("runtime_env") or {}
    if submitted.get("py_modules"):
        log.info("the submitted job ships py_modules of its own: hsic_ray is not shipped again")
        return None
    return {"py_modules": [PACKAGE_DIR]}


def _join(address: str, ship_package: bool) -> None:
    runtime_env = package_runtime_env() if ship_package else None
    try:
        ray.init(address=address, logging_level=logging.WARNING, runtime_env=runtime_env)
    except ConnectionError as exc:  # found, but not joined: another network, a dead head, another Ray version
        raise ClusterConnectionError(
            f"could not join the Ray cluster at {address} ({str(exc).strip().splitlines()[-1]}); check that it runs "
            "and is reachable from here (`ray status`), or pass --ray-address"
        ) from None
    except ValueError:
        raise
    except Exception as exc:  # Ray 2.60 reports a refused token as AssertionError or AuthenticationError
        if not _is_refused_token(exc):
            raise
        raise _token_refused(address) from None


def _is_refused_token(exc: Exception) -> bool:
    return "auth" in str(exc).lower()


def _token_refused(address: str) -> ClusterConnectionError:
    return ClusterConnectionError(
        f"the Ray cluster at {address} refused this process's authentication; run `ray start`, `ray status`, "
        "`ray job submit` and this job with the same RAY_AUTH_MODE (token or disabled)"
    )


def _fix(source: str) -> str:
    """How to give another address, in the words of where this one came from."""
    return "fix or unset RAY_ADDRESS" if source == "RAY_ADDRESS" else f"fix {source}"


def check_address(address: str, source: str = "--ray-address") -> None:
    """Fail in seconds, naming the fix, when `address` is malformed or nothing listens there. `source` names
    where the address came from in the error: the flag (--ray-address), or RAY_ADDRESS from the environment."""
    given = f"RAY_ADDRESS={address!r}" if source == "RAY_ADDRESS" else f"{source} {address!r}"
    if address == "local":  # a new cluster: nothing to check
        return
    if address == "auto":
        if started_cluster_address() is None:
            raise ClusterConnectionError(
                f"{given}: no Ray cluster runs on this machine (none that `ray start` started); start one with "
                f"`ray start --head`, or leave out {source} to start a local cluster"
            )
        return
    if not is_ray_address(address):
        raise ClusterConnectionError(
            f"{given} is not a Ray cluster address: give HOST:PORT of the head "
            "(what `ray start --head` prints, port 6379 by default), ray://HOST:10001, auto, or local"
        )
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise ClusterConnectionError(
            f"nothing answers at {address} ({exc.strerror or type(exc).__name__}); start the cluster there "
            f"(`ray start --head`) or {_fix(source)}"
        ) from None
    if not address.startswith("ray://") and not _answers_as_ray_head(address):
        raise ClusterConnectionError(
            f"{address} accepts connections but gives no Ray head's answer within {GCS_TIMEOUT_S:g}s; give the "
            "address `ray start --head` printed (port 6379 by default), or ray://HOST:10001 for Ray Client"
        )


def _answers_as_ray_head(address: str) -> bool:
    """Whether the head's GCS answers within GCS_TIMEOUT_S. ray.init would wait minutes on a port that
    some other server holds; a refusal counts as an answer, for ray.init to report, except a refused token,
    which ray.init retries for about 20 s of warnings: that is reported here, at once."""
    from ray._raylet import GcsClient

    answered, refusals = threading.Event(), []

    def ask() -> None:
        try:
            _ = GcsClient(address=address).cluster_id  # the first request to the GCS
        except Exception as exc:
            refusals.append(exc)
        answered.set()

    threading.Thread(target=ask, daemon=True).start()  # left behind, blocked, when nothing answers
    if not answered.wait(GCS_TIMEOUT_S):
        return False
    if refusals and _is_refused_token(refusals[0]):
        raise _token_refused(address)
    return True


def started_cluster_address() -> str | None:
    """The address of the cluster that the last `ray start --head` on this machine started, if its GCS still
    runs here; else None. `ray start` records that address in Ray's temporary directory (/tmp/ray, or
    $RAY_TMPDIR/ray); Ray's own "auto" lookup trusts that file even when its cluster died without `ray stop`
    (and hangs on it), and otherwise joins any cluster it finds running here, one that another program's
    ray.init() started included."""
    from ray._common.utils import get_ray_address_file
    from ray._private.services import find_gcs_addresses

    try:
        with open(get_ray_address_file(None)) as f:
            address = f.read().strip()
    except OSError:
        return None
    return address if address and address in find_gcs_addresses() else None


def connect(
    address: str | None,
    local_cpus: float,
    processes: int = 1,
    cpus_per_process: float = 1.0,
    ship_package: bool = True,
    state_api: bool = False,
) -> None:
    """Connect this process to Ray: `address`, else RAY_ADDRESS, else a cluster started on this machine
    with `ray start`, else a new local cluster with at least `local_cpus` logical CPUs, if this machine can
    hold `processes` workers of `cpus_per_process` CPUs each. The address "local" (as in Ray) always starts
    a new local cluster, whatever runs on this machine.

    Joining an existing cluster, `ship_package` (config `ray.ship_package`) ships this hsic_ray package to
    the job's workers (`package_runtime_env`); a new local cluster's workers import it as this process does.
    With `state_api`, a new local cluster serves Ray's state API (its full dashboard process, slower to start
    than the minimal one it runs otherwise): Ray Train's placement-group cleaner asks it every second whether
    the controller lives, and logs a warning each time it cannot.
    """
    if ray.is_initialized():
        return
    _connect(address, local_cpus, processes, cpus_per_process, ship_package, state_api)
    interrupt.reclaim()  # ray.init put its own SIGTERM handler in place of the job's, and it aborts the process


def connect_for_stages(ray_cfg: RayConfig) -> None:
    """`connect` for a pipeline of ray.stages stages (None: one per core of this machine) and its coordinator."""
    stages = ray_cfg.stages or os.cpu_count() or 1
    connect(
        ray_cfg.address,
        local_cpus=stages * ray_cfg.cpus_per_stage + ray_cfg.coordinator_cpus,
        processes=stages + 1,
        cpus_per_process=max(ray_cfg.cpus_per_stage, ray_cfg.coordinator_cpus),
        ship_package=ray_cfg.ship_package,
    )


def _connect(
    address: str | None,
    local_cpus: float,
    processes: int,
    cpus_per_process: float,
    ship_package: bool,
    state_api: bool,
) -> None:
    default_auth_mode()
    plain_log_prefixes_off_a_terminal()
    source = "--ray-address" if address else "RAY_ADDRESS"  # named in errors: the flag, or the environment's
    address = address or os.environ.get("RAY_ADDRESS")
    if address and address != "local":
        check_address(address, source)  # a HOST:PORT's head asked once (a refused token: one line now)
        if address == "auto":  # the cluster `ray start` started here, which check_address found running
            address = started_cluster_address() or address
            _answers_as_ray_head(address)
        _join(address, ship_package)
        log.info("connected to the Ray cluster at %s", address)
        return
    running = None if address == "local" else started_cluster_address()
    if running:
        _answers_as_ray_head(running)  # a refused token: one line now, before ray.init's 20 s of retries
        _join(running, ship_package)
        log.info("connected to the Ray cluster running on this machine")
        return
    check_local_cluster(processes, cpus_per_process)
    # address="local": always a new cluster, whatever address file an earlier one left behind.
    # Logical CPUs are scheduling tokens: the coordinator's and each stage's are reserved even where this
    # machine has fewer cores (each stage actor runs its math on as many threads as it reserved).
    cpus = max(float(os.cpu_count() or 1), local_cpus)
    with _own_state_api(state_api) as dashboard_port, _quiet_token_notice():
        ray.init(
            address="local",
            num_cpus=cpus,
            include_dashboard=state_api,
            dashboard_port=dashboard_port,
            logging_level=logging.WARNING,
        )
    log.info("started a local Ray cluster with %g logical CPUs", cpus)


@contextlib.contextmanager
def _own_state_api(enabled: bool):
    """A free port for the new cluster's dashboard, and RAY_API_SERVER_ADDRESS pointing at it while ray.init
    starts the cluster's processes (they inherit this environment). Without it, a state API client inside the
    cluster (Ray Train's placement-group cleaner) looks for running Ray instances on the machine, and when it
    finds another local cluster there, its thread dies with a traceback."""
    if not enabled:
        yield None
        return
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    saved = os.environ.get(_API_SERVER_ADDRESS)
    os.environ[_API_SERVER_ADDRESS] = f"http://127.0.0.1:{port}"
    try:
        yield port
    finally:
        if saved is None:
            os.environ.pop(_API_SERVER_ADDRESS, None)
        else:
            os.environ[_API_SERVER_ADDRESS] = saved

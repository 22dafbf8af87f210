"""Stopping Ray at a job's end without the second its autoscaler monitor holds it up.

`ray.shutdown()` stops a cluster that this process's `ray.init` started one process after another, each
given a second after SIGTERM before it is killed. All but one exit at once. The autoscaler monitor's SIGTERM
handler reports its own end to the cluster's GCS, which Ray has stopped just before it, and waits there
until it is killed: a second of every Ray job's exit. The monitor keeps no state (a cluster started by
`ray.init` never scales), so it is killed outright, first; a driver that joined a running cluster started
none of its processes and stops none.
"""

from __future__ import annotations

import logging
import subprocess

import ray

log = logging.getLogger("hsic_ray")

MONITOR_EXIT_TIMEOUT_S = 1.0  # Ray's own bound on each process it stops


def shutdown() -> None:
    """`ray.shutdown()`, with the autoscaler monitor of a cluster this process started killed first."""
    kill_started_monitor()
    ray.shutdown()


def kill_started_monitor() -> None:
    """Kill the autoscaler monitor of the cluster this process's `ray.init` started, if any; the cluster
    runs on without it."""
    monitor = started_monitor()
    if monitor is None or monitor.poll() is not None:
        return
    monitor.kill()
    try:
        monitor.wait(timeout=MONITOR_EXIT_TIMEOUT_S)
    except subprocess.TimeoutExpired:  # ray.shutdown gives it up after its own second
        log.debug("Ray's autoscaler monitor (pid %d) did not exit when killed", monitor.pid)


def started_monitor() -> subprocess.Popen | None:
    """The autoscaler monitor of the cluster this process's `ray.init` started, or None: no cluster started
    here, or a Ray whose internals differ from 2.60's (then `ray.shutdown` stops it as it always does)."""
    try:
        from ray._private import ray_constants, worker
    except ImportError:
        return None
    node = getattr(worker, "_global_node", None)
    processes = getattr(node, "all_processes", None)  # empty for a driver that joined a running cluster
    if not isinstance(processes, dict):
        return None
    started = processes.get(getattr(ray_constants, "PROCESS_TYPE_MONITOR", None)) or []
    process = getattr(started[0], "process", None) if len(started) == 1 else None
    return process if isinstance(process, subprocess.Popen) else None

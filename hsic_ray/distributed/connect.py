"""Finding the Ray cluster to run on: the one given, a running one, or a fresh local one.

Ray 2.60 turns token authentication on by default for clusters started locally. The job, `ray status` and
`ray job submit` must agree with the cluster on `RAY_AUTH_MODE`; leaving it unset everywhere (token mode,
with the token file Ray writes in the home directory) or exporting `RAY_AUTH_MODE=disabled` before
`ray start` and every later command both work. See the README.
"""

from __future__ import annotations

import logging
import os

import ray

log = logging.getLogger("hsic_ray")


def connect(address: str | None, local_cpus: float) -> None:
    """Connect this process to Ray: `address`, else RAY_ADDRESS, else a cluster started on this machine
    with `ray start`, else a new local cluster with at least `local_cpus` logical CPUs."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
        log.info("connected to the Ray cluster at %s", address)
        return
    try:
        ray.init(address="auto", logging_level=logging.WARNING)
        log.info("connected to the Ray cluster running on this machine")
        return
    except ConnectionError:
        pass
    # Logical CPUs are scheduling tokens: the coordinator's and each stage's are reserved even where this
    # machine has fewer cores (each stage actor runs its math on as many threads as it reserved).
    cpus = max(float(os.cpu_count() or 1), local_cpus)
    ray.init(num_cpus=cpus, include_dashboard=False, logging_level=logging.WARNING)
    log.info("started a local Ray cluster with %g logical CPUs", cpus)

"""Telling Ray Train's workers that their driver wants them to stop, or is gone.

The driver's signal handler (hsic_ray.interrupt) only notes a SIGINT or SIGTERM; its main thread waits in
`TorchTrainer.fit`. `StopRequest` passes the note on: a small actor owned by the driver holds it, a thread of
the driver sets it, and the workers' `StopCheck` reads it between steps. Rank 0 reads it (at most every
`POLL_SECONDS`) and broadcasts its answer to the other ranks at every step, so that every rank stops at the
same step; the workers then checkpoint and return, and `fit` returns.

Workers also stop, without a checkpoint (the run is continued from the checkpoints on disk), when their
driver died. A driver killed with SIGKILL takes a local cluster it started down with it (Ray starts its
GCS and raylet to die with their parent), but not the worker processes: they are the raylet's children, and
Ray Train's workers went on training and writing checkpoints (actor-to-actor calls need neither GCS nor
raylet). So a worker stops once its raylet is gone (its parent pid changes), or once the flag actor is:
on a cluster the driver joined, Ray ends the dead driver's actors, the flag and Ray Train's included.
"""

from __future__ import annotations

import logging
import os
import threading
import time

import ray
import torch

from hsic_ray import interrupt

log = logging.getLogger("hsic_ray")

POLL_SECONDS = 0.5  # between rank 0's reads of the request: a stop waits at most this long (and a step)


@ray.remote(num_cpus=0)
class _Flag:
    def __init__(self) -> None:
        self.stop = False

    def set(self) -> None:
        self.stop = True

    def get(self) -> bool:
        return self.stop


class StopRequest:
    """The driver's side: while in `with`, a signal (hsic_ray.interrupt) sets the flag the workers read."""

    def __init__(self) -> None:
        self.flag = _Flag.remote()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="hsic-ray-stop-request", daemon=True)

    def _watch(self) -> None:
        while not self._done.wait(0.1):
            if interrupt.requested():
                ray.get(self.flag.set.remote())
                return

    def __enter__(self) -> StopRequest:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()


class DriverGone(RuntimeError):
    """The worker's driver no longer runs."""


class StopCheck:
    """A worker's side: whether to stop before the next step (raises DriverGone when the driver died)."""

    def __init__(self, flag, rank: int, world: int, device: torch.device):
        self.flag, self.rank, self.world, self.device = flag, rank, world, device
        self._asked = 0.0
        self._raylet = os.getppid()  # a worker is a child of its node's raylet
        self.stop = False

    def __call__(self) -> bool:
        if time.monotonic() - self._asked >= POLL_SECONDS:
            self._asked = time.monotonic()
            self._ask()
        if self.world > 1:
            answer = torch.tensor([1.0 if self.stop else 0.0], device=self.device)
            torch.distributed.broadcast(answer, src=0)
            self.stop = bool(answer.item())
        return self.stop

    def _ask(self) -> None:
        if os.getppid() != self._raylet:  # the raylet died: a local cluster goes with its driver
            raise DriverGone("this worker's Ray node is gone, with the driver that started it; stopping")
        if self.rank != 0 or self.stop:
            return
        try:
            self.stop = ray.get(self.flag.get.remote(), timeout=30)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            raise DriverGone("the driver of this Ray Train run is gone; stopping its workers") from None

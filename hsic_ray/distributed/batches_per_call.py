"""How many batches a stage takes per call, when `ray.batches_per_call` is unset, and so how many are in flight.

The pipeline times its first groups at one batch per call: the slowest stage's step, and its wait between
calls, which is Ray's cost per call (the call, its arguments and results, the coordinator's submission)
measured on the cluster at hand. It then takes the fewest batches per call that keep that wait under
CALL_SHARE of a call's compute, up to MAX_BATCHES_PER_CALL, but no more than minimises the time between the
training loop's drains (docs/design.md, "Choosing batches per call").
"""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Callable
from typing import Any

from hsic_ray.config import RayConfig

log = logging.getLogger("hsic_ray")

CALL_SHARE = 0.1
MAX_BATCHES_PER_CALL = 16
GROUPS_BEFORE_CHOOSING = 6  # the first is not counted: a stage's first call has no wait before it


def choose_batches_per_call(busy: float, overhead: float, stages: int, drain_every: int | None = None) -> int:
    """Batches per call for a pipeline whose slowest stage computes for `busy` seconds per batch and waits
    `overhead` seconds between calls (Ray's cost per call: the call, its arguments and results, the
    coordinator's submission): enough that the wait stays under CALL_SHARE of a call's compute.

    With `drain_every`, the loop waits for every batch in flight that often (an epoch's end, a checkpoint),
    and the pipeline drains and refills: it idles for about (stages - 1) groups' time, which larger groups
    lengthen. Then k is the one of those that minimises the time between waits, (drain_every + (stages - 1)
    k) (busy + overhead / k)."""
    busy = max(busy, 1e-6)
    enough = max(1, min(MAX_BATCHES_PER_CALL, math.ceil(overhead / (CALL_SHARE * busy))))
    if drain_every is None or stages == 1:
        return enough
    return min(range(1, enough + 1), key=lambda k: (drain_every + (stages - 1) * k) * (busy + overhead / k))


class BatchesPerCall:
    """The batches per call and the bound on batches in flight: as set, or at one batch per call until the
    first groups are timed, then chosen from them.

    `drain_every(seconds_per_batch)`: batches between the training loop's waits for every batch in flight
    (see `hsic_ray.trainer.batches_between_drains`); None for a loop that never waits."""

    def __init__(
        self,
        cfg: RayConfig,
        stages: int,
        drain_every: Callable[[float], int] | None = None,
    ):
        self.value = cfg.batches_per_call or 1
        self._fixed = cfg.batches_per_call is not None
        self._max_in_flight = cfg.max_in_flight
        self._stages = stages
        self._drain_every = drain_every
        # The slowest stage's (busy seconds per batch, idle seconds before the call), per group, until chosen.
        self._call_times: list[tuple[float, float]] = []

    @property
    def max_in_flight(self) -> int:
        # Two groups per stage: one being computed and one waiting, so a stage that finishes a group finds
        # the next one there even when the stage before it is running late (against stages + 1 and 3 x
        # stages: docs/results.md, "Batches in flight").
        return self._max_in_flight or 2 * self._stages * self.value

    @property
    def settled(self) -> bool:
        """Whether the batches per call (and so the in-flight bound) are final: set, or chosen already."""
        return self._fixed or len(self._call_times) >= GROUPS_BEFORE_CHOOSING

    def record(self, reports: list[dict[str, Any]]) -> dict[str, Any] | None:
        """Time the slowest stage's call of a group, from its stages' reports. Returns the choice and what it
        was made from, a `batches_per_call` record for metrics.jsonl, once these times complete it.

        The slowest stage's wait between calls is Ray's cost per call: once it has had its first group, the
        stages before it (faster, or they would be the slowest) have its next one ready, and what it still
        waits for is the call itself, its arguments and results, or the coordinator's submission."""
        if self.settled:
            return None
        slowest = max(reports, key=lambda r: r["busy"])
        self._call_times.append((slowest["busy"] / len(slowest["stats"]), slowest["idle"]))
        if len(self._call_times) < GROUPS_BEFORE_CHOOSING:
            return None
        busy, overhead = (statistics.median(t) for t in zip(*self._call_times[1:]))
        # The slowest stage's step sets the pipeline's pace, which larger groups approach.
        drain_every = None if self._drain_every is None else self._drain_every(busy)
        self.value = choose_batches_per_call(busy, overhead, self._stages, drain_every)
        log.info(
            "slowest stage: %.1f ms per batch, %.1f ms between calls: %d batches per call, %d in flight",
            1e3 * busy,
            1e3 * overhead,
            self.value,
            self.max_in_flight,
        )
        return {
            "kind": "batches_per_call",
            "batches_per_call": self.value,
            "max_in_flight": self.max_in_flight,
            "step_ms": 1e3 * busy,
            "call_overhead_ms": 1e3 * overhead,
        }

"""The stage actors of a run: started in their placement bundles, recreated when they die, asked in turn.

One placement group holds the run (`hsic_ray.distributed.placement`); stage s runs in bundle s + 1. When a
stage dies (its process killed, its node lost), `recover` recreates it in its bundle from the latest
checkpoint (the restore point) and records a recovery event; after `ray.max_recoveries` the run gives up
with `PipelineFailed`. Requests to every stage (evaluation, BatchNorm calibration, checkpoints) recover the
same way and run again (docs/design.md, "Recovery").
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import ray
from ray.exceptions import GetTimeoutError, ObjectLostError, OwnerDiedError, RayActorError
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from hsic_ray.config import RayConfig
from hsic_ray.distributed.placement import StageSpec, reserve
from hsic_ray.distributed.stage_actor import StageActor, StageSettings

log = logging.getLogger("hsic_ray")

# Failures after which a stage is recreated and what it lost is asked of it again.
LOST = (RayActorError, ObjectLostError, OwnerDiedError)

T = TypeVar("T")


class PipelineFailed(RuntimeError):
    """Stages kept failing after `ray.max_recoveries` recoveries."""


class Stages:
    """One actor per stage spec, in the run's placement group; `placements` says where each runs."""

    def __init__(self, specs: list[StageSpec], cfg: RayConfig, settings: StageSettings):
        self.specs = specs
        self.cfg = cfg
        self._settings = settings
        self._group, self._owns_group = reserve(specs, cfg)
        self._restore_point: tuple[str, int] | None = None  # (run location, step) a new actor loads
        self._events: list[dict[str, Any]] = []
        self._recoveries = 0
        self.actors = [self._start(spec) for spec in specs]
        self.placements: list[dict[str, Any]] = ray.get([a.where.remote() for a in self.actors])

    def _start(self, spec: StageSpec) -> ray.actor.ActorHandle:
        strategy = PlacementGroupSchedulingStrategy(self._group, placement_group_bundle_index=spec.index + 1)
        return StageActor.options(num_cpus=spec.num_cpus, num_gpus=spec.num_gpus, scheduling_strategy=strategy).remote(
            spec, self._settings, restore=self._restore_point
        )

    @property
    def recoveries(self) -> int:
        return self._recoveries

    def events(self) -> list[dict[str, Any]]:
        """The recoveries since the last call, for metrics.jsonl."""
        events, self._events = self._events, []
        return events

    # --- recovery -------------------------------------------------------------------------------------

    def retrying(self, call: Callable[[], T], what: str, after_recovery: Callable[[], None] | None = None) -> T:
        """`call()`, run again after recovering the stages that died meanwhile (and `after_recovery()`, to
        ask them again for what they lost), up to `ray.max_recoveries` + 1 times; `what` names the request."""
        for _ in range(self.cfg.max_recoveries + 1):
            try:
                return call()
            except LOST as err:
                # A stage's death reaches the coordinator through a later stage's task, wrapped in its
                # RayTaskError: recover from what happened, not from the wrapper.
                self.recover(getattr(err, "cause", None) or err)
                if after_recovery is not None:
                    after_recovery()
        raise PipelineFailed(f"{what} failed {self.cfg.max_recoveries + 1} times in a row; see the Ray logs")

    def recover(self, err: Exception) -> None:
        """Recreate every stage that `err` says, or a health check finds, is dead."""
        for stage in self._dead_stages(err):
            self._recoveries += 1
            if self._recoveries > self.cfg.max_recoveries:
                raise PipelineFailed(
                    f"stage {stage} failed again after {self.cfg.max_recoveries} recoveries: {err}"
                ) from err
            started = time.perf_counter()
            ray.kill(self.actors[stage], no_restart=True)
            self.placements[stage] = self._restart(stage)
            self._record_recovery(stage, err, time.perf_counter() - started)

    def _record_recovery(self, stage: int, err: Exception, seconds: float) -> None:
        restored = None if self._restore_point is None else self._restore_point[1]
        event = {
            "kind": "recovery",
            "stage": stage,
            "error": type(err).__name__,
            "restored_from_step": restored,
            "seconds": seconds,
            "node_ip": self.placements[stage]["node_ip"],
        }
        self._events.append(event)
        log.warning(
            "stage %d died (%s); recreated from checkpoint step %s on %s in %.1fs",
            stage,
            event["error"],
            restored,
            event["node_ip"],
            seconds,
        )

    def _dead_stages(self, err: Exception) -> list[int]:
        dead_id = getattr(err, "actor_id", None)
        by_id = [s for s, a in enumerate(self.actors) if a._actor_id.hex() == dead_id]
        if by_id:
            return by_id
        dead = []
        for stage, actor in enumerate(self.actors):
            try:
                ray.get(actor.where.remote(), timeout=self.cfg.placement_timeout_s)
            except (RayActorError, GetTimeoutError):
                dead.append(stage)
        return dead

    def _restart(self, stage: int) -> dict[str, Any]:
        """A new actor for `stage` in its bundle; returns where it runs. When the stage's node has just died,
        Ray can place the new actor there before it declares the node dead (seconds later); the actor then
        dies unstarted, and Ray moves the bundle to a live node: start it again until it runs."""
        deadline = time.monotonic() + self.cfg.placement_timeout_s
        while True:
            self.actors[stage] = self._start(self.specs[stage])
            try:
                return ray.get(self.actors[stage].where.remote(), timeout=max(1.0, deadline - time.monotonic()))
            except RayActorError:
                if time.monotonic() > deadline:
                    raise
                ray.kill(self.actors[stage], no_restart=True)
                time.sleep(1.0)
            except GetTimeoutError:
                raise PipelineFailed(
                    f"stage {stage} could not be recreated within {self.cfg.placement_timeout_s:g}s: no live "
                    f"node has room for its bundle {self.specs[stage].bundle()} ({ray.available_resources()} free)"
                ) from None

    # --- requests to every stage ----------------------------------------------------------------------

    def through(self, method: str, value: Any, *args: Any, side_outputs: bool = False) -> Any:
        """`value` passed through every stage's `method` in turn, each taking the stage before's output (and
        `args`, put once for all): the last stage's output, or with `side_outputs` (methods that return
        (output, side output)) every stage's side output. Recovers and runs again as `retrying` does."""
        return self.retrying(
            lambda: ray.get(self._submit_through(method, value, args, side_outputs)),
            f"a {method} request to the stages",
        )

    def through_each(
        self, method: str, values: Iterable[Any], window: int, side_outputs: bool = False, args: tuple = ()
    ) -> Iterator[Any]:
        """`through` for each of `values` (with `args`, the same for each), in order, with up to `window` of
        them in flight: stage s works on one while stage s + 1 works on the one before, so a pass over many
        chunks takes about the slowest stage's time, not the sum of all. A value lost with a stage is asked
        again through `through`."""
        pending: collections.deque[tuple[Any, Any]] = collections.deque()
        for value in values:
            pending.append((value, self._submit_through(method, value, args, side_outputs)))
            if len(pending) >= window:
                yield self._collect(method, *pending.popleft(), args, side_outputs)
        while pending:
            yield self._collect(method, *pending.popleft(), args, side_outputs)

    def _submit_through(self, method: str, value: Any, args: tuple, side_outputs: bool) -> Any:
        ref, arg_refs, sides = ray.put(value), [ray.put(arg) for arg in args], []
        for actor in self.actors:
            remote = getattr(actor, method)
            if side_outputs:
                ref, side = remote.options(num_returns=2).remote(ref, *arg_refs)
                sides.append(side)
            else:
                ref = remote.remote(ref, *arg_refs)
        return sides if side_outputs else ref

    def _collect(self, method: str, value: Any, refs: Any, args: tuple, side_outputs: bool) -> Any:
        try:
            return ray.get(refs)
        except LOST:  # `through` recovers the stages that died and asks again
            return self.through(method, value, *args, side_outputs=side_outputs)

    def save(self, run_location: str, step: int) -> None:
        # A stage recreated meanwhile saves the state it was restored to, as it trains on from it.
        self.retrying(lambda: ray.get([actor.save.remote(run_location, step) for actor in self.actors]), "a checkpoint")
        self._restore_point = (run_location, step)

    def load(self, run_location: str, step: int) -> None:
        ray.get([actor.load.remote(run_location, step) for actor in self.actors])
        self._restore_point = (run_location, step)

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        if self._owns_group:
            ray.util.remove_placement_group(self._group)

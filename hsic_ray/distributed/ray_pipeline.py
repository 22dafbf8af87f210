"""The Ray pipeline: stage actors chained by object refs, with failed stages recreated from checkpoints.

`submit` gathers consecutive batches into groups of `ray.batches_per_call`; a full group goes into the
object store once (inputs, and factors or labels) and a chain of `stage[s].step` calls, each taking the
previous stage's `Hop` ref and the group's factors: Ray's ordered actor queues then run stage s on group g
while stage s + 1 runs on group g - 1, and activations move from actor to actor without passing through
the driver. Since no stage feeds
back to an earlier one, every stage sees the same inputs in the same order as in the in-process trainer,
whatever the number of batches in flight or per call: the results are the same. `result` fetches one
small object per group, the reports the last stage returns.

Each batch's factors (`ray.factors_on`) are computed once for every stage: by the coordinator on its CPU
(a thread of the training loop computes them ahead), or by the first stage on its device, in its step
call from the group's inputs and labels, which returns them as one more object for the stages after it.
With stages on GPUs the coordinator's CPU would be the slowest part of the pipeline (README, "Ray
pipeline").

When a stage actor dies (its process killed, its node lost), `result` recreates it in its placement
bundle from the latest checkpoint and resends the groups it lost, from the first stage that failed;
evaluation and checkpoint requests recover the same way and run again.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
import torch
from ray.exceptions import ObjectLostError, OwnerDiedError, RayActorError
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from torch import Tensor

from hsic_ray.config import ExperimentConfig
from hsic_ray.data import Batch
from hsic_ray.distributed.placement import StageSpec, describe_plan, reserve
from hsic_ray.distributed.stage_actor import Hop, StageActor, WireFactors, factors_to_numpy
from hsic_ray.models import Shape
from hsic_ray.objective import KernelFactors
from hsic_ray.pipeline import StepResult
from hsic_ray.run.directory import RunDirectory
from hsic_ray.schedule import LRSchedule

log = logging.getLogger("hsic_ray")

# Failures after which a stage is recreated and its lost batches resent.
_LOST = (RayActorError, ObjectLostError, OwnerDiedError)

# How many batches a stage takes per call, when `ray.batches_per_call` is unset: the pipeline times its first
# groups at one batch per call, then keeps Ray's cost per call under CALL_SHARE of a call's compute.
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


class PipelineFailed(RuntimeError):
    """Stages kept failing after `ray.max_recoveries` recoveries."""


@dataclass
class _Group:
    """Consecutive batches sent through the stages in one call each: inputs, each stage's hop, the reports."""

    # (x, labels, factors) until launched; factors None when the first stage computes them
    batches: list[tuple[np.ndarray, np.ndarray, WireFactors | None]] = field(default_factory=list)
    inputs: ray.ObjectRef | None = None
    labels: ray.ObjectRef | None = None  # for the first stage's factors
    factors: ray.ObjectRef | None = None
    hops: list = field(default_factory=list)  # per stage: its Hop (the last stage's: its outputs)
    reports_ref: ray.ObjectRef | None = None
    reports: list[dict[str, Any]] | None = None
    outputs: list[np.ndarray] | None = None

    @property
    def launched(self) -> bool:
        return self.inputs is not None


@dataclass
class _Handle:
    group: _Group
    slot: int


class RayPipeline:
    def __init__(
        self,
        cfg: ExperimentConfig,
        specs: list[StageSpec],
        input_shape: Shape,
        num_classes: int,
        schedule: LRSchedule | None = None,
        drain_every: Callable[[float], int] | None = None,
    ):
        """`drain_every(seconds_per_batch)`: batches between the training loop's waits for every batch in
        flight (see `hsic_ray.trainer.batches_between_drains`); None for a loop that never waits."""
        self.cfg = cfg
        self.specs = specs
        self.num_stages = len(specs)
        self.factors_on = cfg.ray.factors_on or ("first_stage" if specs[0].num_gpus > 0 else "coordinator")
        # A coordinator that computes factors mostly waits for the stages: factors computed meanwhile in a
        # thread cost nothing. None: the loop hands over labels, for the first stage.
        self.factors_device = torch.device("cpu") if self.factors_on == "coordinator" else None
        self.prefetch_factors = self.factors_on == "coordinator"
        self.batches_per_call = cfg.ray.batches_per_call or 1
        self.max_in_flight = self._in_flight_bound()
        self._actor_args = (cfg, tuple(input_shape), num_classes, schedule)
        self._group, self._owns_group = reserve(specs, cfg.ray)
        self._restore_point: tuple[str, int] | None = None
        self._events: list[dict[str, Any]] = []
        self._recoveries = 0
        self._filling = _Group()
        self._drain_every = drain_every
        # The slowest stage's (busy seconds per batch, idle seconds before the call), per group, until
        # batches_per_call is chosen.
        self._call_times: list[tuple[float, float]] = []
        self.actors = [self._start(spec) for spec in specs]
        self.placements = ray.get([a.where.remote() for a in self.actors])
        log.info(
            "pipeline plan (%d stages, %d in flight, factors on the %s):\n%s",
            self.num_stages,
            self.max_in_flight,
            self.factors_on.replace("_", " "),
            describe_plan(specs, self.placements),
        )

    def _in_flight_bound(self) -> int:
        # Two groups per stage: one being computed and one waiting, so a stage that finishes a group finds
        # the next one there even when the stage before it is running late. Measured on 2 cores with 8
        # stages (benchmarks/bench_pipeline.py): efficiency 0.70 at stages + 1 in flight, 0.81 at 2 x stages,
        # 0.79 at 3 x stages.
        return self.cfg.ray.max_in_flight or 2 * self.num_stages * self.batches_per_call

    def _start(self, spec: StageSpec) -> ray.actor.ActorHandle:
        strategy = PlacementGroupSchedulingStrategy(self._group, placement_group_bundle_index=spec.index + 1)
        return StageActor.options(num_cpus=spec.num_cpus, num_gpus=spec.num_gpus, scheduling_strategy=strategy).remote(
            spec, *self._actor_args, restore=self._restore_point
        )

    # --- training -------------------------------------------------------------------------------------

    def submit(self, batch: Batch, factors: KernelFactors | None) -> _Handle:
        handle = _Handle(self._filling, len(self._filling.batches))
        wire = None if factors is None else factors_to_numpy(factors)
        self._filling.batches.append((batch.x.numpy(), batch.y.numpy(), wire))
        if len(self._filling.batches) >= self.batches_per_call:
            self._launch()
        return handle

    def _launch(self) -> None:
        group, self._filling = self._filling, _Group()
        xs, labels, factors = zip(*group.batches)
        group.inputs = ray.put(Hop(list(xs), []))
        if self.factors_on == "coordinator":
            group.factors = ray.put(list(factors))
        else:
            group.labels = ray.put(list(labels))
        group.batches = []
        self._chain(group, first_stage=0)

    def _chain(self, group: _Group, first_stage: int) -> None:
        del group.hops[first_stage:]
        hop = group.inputs if first_stage == 0 else group.hops[first_stage - 1]
        for stage in range(first_stage, self.num_stages):
            hop, *rest = self._call_step(stage, hop, group)
            group.hops.append(hop)
        group.reports_ref = rest[0]

    def _call_step(self, stage: int, hop: ray.ObjectRef, group: _Group) -> list[ray.ObjectRef]:
        """Stage `stage`'s step on `group`: its hop's ref, and the last stage's reports' ref after it. A first
        stage that computes the factors also sets `group.factors`, its ref to them, for the stages after."""
        actor, last = self.actors[stage], stage == self.num_stages - 1
        if stage == 0 and self.factors_on == "first_stage":
            *refs, group.factors = actor.step_first.options(num_returns=3 if last else 2).remote(
                hop, group.labels, last
            )
            return refs
        if last:
            return actor.step_last.options(num_returns=2).remote(hop, group.factors)
        return [actor.step.remote(hop, group.factors)]

    def result(self, handle: _Handle, want_output: bool, read_back: bool = True) -> StepResult:
        # Stage reports are host data already (each actor checks its own health every call): read_back is moot.
        group = handle.group
        if not group.launched:
            self._launch()  # the loop needs a batch of a group still filling: send what there is
        if group.reports is None:
            self._fetch(group)
        if want_output and group.outputs is None:
            group.outputs = ray.get(group.hops[-1])
        stats = torch.from_numpy(np.concatenate([r["stats"][handle.slot] for r in group.reports]))
        output = torch.from_numpy(np.array(group.outputs[handle.slot])) if want_output else None
        size = len(group.reports[0]["stats"])  # a call's times are shared by the batches of its group
        seconds = [(r["busy"] / size, r["idle"] / size) for r in group.reports]
        return StepResult(stats, output, seconds, [r["transfer"] / size for r in group.reports])

    def _fetch(self, group: _Group) -> None:
        for _ in range(self.cfg.ray.max_recoveries + 1):
            try:
                group.reports = ray.get(group.reports_ref)
                break
            except _LOST as err:
                # A stage's death reaches the coordinator through the last stage's task, wrapped in its
                # RayTaskError: recover from what happened, not from the wrapper.
                self._recover(getattr(err, "cause", None) or err)
                self._chain(group, self._first_failed_stage(group))
        else:
            raise PipelineFailed(f"a batch failed {self.cfg.ray.max_recoveries + 1} times in a row; see the Ray logs")
        self._choose_batches_per_call(group.reports)

    @property
    def settled(self) -> bool:
        """Whether the batches per call (and so the in-flight bound) are final: set, or chosen already."""
        return self.cfg.ray.batches_per_call is not None or len(self._call_times) >= GROUPS_BEFORE_CHOOSING

    def _choose_batches_per_call(self, reports: list[dict[str, Any]]) -> None:
        """Time the slowest stage's calls of the first groups, then choose the batches per call from them.

        Its wait between calls is Ray's cost per call: once it has had its first group, the stages before it
        (faster, or they would be the slowest) have its next one ready, and what it still waits for is the
        call itself, its arguments and results, or the coordinator's submission."""
        if self.settled:
            return
        slowest = max(reports, key=lambda r: r["busy"])
        self._call_times.append((slowest["busy"] / len(slowest["stats"]), slowest["idle"]))
        if len(self._call_times) < GROUPS_BEFORE_CHOOSING:
            return
        busy, overhead = (statistics.median(t) for t in zip(*self._call_times[1:]))
        # The slowest stage's step sets the pipeline's pace, which larger groups approach.
        drain_every = None if self._drain_every is None else self._drain_every(busy)
        self.batches_per_call = choose_batches_per_call(busy, overhead, self.num_stages, drain_every)
        self.max_in_flight = self._in_flight_bound()
        self._events.append(
            {
                "kind": "batches_per_call",
                "batches_per_call": self.batches_per_call,
                "max_in_flight": self.max_in_flight,
                "step_ms": 1e3 * busy,
                "call_overhead_ms": 1e3 * overhead,
            }
        )
        log.info(
            "slowest stage: %.1f ms per batch, %.1f ms between calls: %d batches per call, %d in flight",
            1e3 * busy,
            1e3 * overhead,
            self.batches_per_call,
            self.max_in_flight,
        )

    def _first_failed_stage(self, group: _Group) -> int:
        try:
            ray.get(group.factors)
        except (RayActorError, ObjectLostError, OwnerDiedError):
            return 0  # the first stage died computing them, or they are gone with its node
        for stage, hop in enumerate(group.hops):
            try:
                ray.get(hop)
            except RayActorError:
                return stage
            except (ObjectLostError, OwnerDiedError):
                return 0  # an input the stage needed is gone with its node: resend the group from the start
        return self.num_stages - 1

    # --- recovery -------------------------------------------------------------------------------------

    def _dead_stages(self, err: Exception) -> list[int]:
        dead_id = getattr(err, "actor_id", None)
        by_id = [s for s, a in enumerate(self.actors) if a._actor_id.hex() == dead_id]
        if by_id:
            return by_id
        dead = []
        for stage, actor in enumerate(self.actors):
            try:
                ray.get(actor.where.remote(), timeout=self.cfg.ray.placement_timeout_s)
            except (RayActorError, ray.exceptions.GetTimeoutError):
                dead.append(stage)
        return dead

    def _recover(self, err: Exception) -> None:
        for stage in self._dead_stages(err):
            self._recoveries += 1
            if self._recoveries > self.cfg.ray.max_recoveries:
                raise PipelineFailed(
                    f"stage {stage} failed again after {self.cfg.ray.max_recoveries} recoveries: {err}"
                ) from err
            started = time.perf_counter()
            ray.kill(self.actors[stage], no_restart=True)
            self.placements[stage] = self._restart(stage)
            restored = None if self._restore_point is None else self._restore_point[1]
            event = {
                "kind": "recovery",
                "stage": stage,
                "error": type(err).__name__,
                "restored_from_step": restored,
                "seconds": time.perf_counter() - started,
                "node_ip": self.placements[stage]["node_ip"],
            }
            self._events.append(event)
            log.warning(
                "stage %d died (%s); recreated from checkpoint step %s on %s in %.1fs",
                stage,
                event["error"],
                restored,
                event["node_ip"],
                event["seconds"],
            )

    def _restart(self, stage: int) -> dict[str, Any]:
        """A new actor for `stage` in its bundle; returns where it runs. When the stage's node has just died,
        Ray can place the new actor there before it declares the node dead (seconds later); the actor then
        dies unstarted, and Ray moves the bundle to a live node: start it again until it runs."""
        deadline = time.monotonic() + self.cfg.ray.placement_timeout_s
        while True:
            self.actors[stage] = self._start(self.specs[stage])
            try:
                return ray.get(self.actors[stage].where.remote(), timeout=max(1.0, deadline - time.monotonic()))
            except RayActorError:
                if time.monotonic() > deadline:
                    raise
                ray.kill(self.actors[stage], no_restart=True)
                time.sleep(1.0)
            except ray.exceptions.GetTimeoutError:
                raise PipelineFailed(
                    f"stage {stage} could not be recreated within {self.cfg.ray.placement_timeout_s:g}s: no live "
                    f"node has room for its bundle {self.specs[stage].bundle()} ({ray.available_resources()} free)"
                ) from None

    def events(self) -> list[dict[str, Any]]:
        events, self._events = self._events, []
        return events

    # --- evaluation and checkpoints -------------------------------------------------------------------

    def _recovering(self, call):
        """`call()`, a request to every stage (evaluation, checkpoint), run again after recovering a stage
        that died meanwhile, as `_fetch` does for training."""
        for _ in range(self.cfg.ray.max_recoveries + 1):
            try:
                return call()
            except _LOST as err:
                self._recover(getattr(err, "cause", None) or err)
        raise PipelineFailed(f"a request to the stages failed {self.cfg.ray.max_recoveries + 1} times in a row")

    def forward(self, x: Tensor) -> Tensor:
        def call():
            ref = ray.put(x.numpy())
            for actor in self.actors:
                ref = actor.forward.remote(ref)
            return torch.from_numpy(np.array(ray.get(ref)))

        return self._recovering(call)

    def calibrate_batchnorm(self, batches: list[Tensor]) -> None:
        def call():
            ref = ray.put([x.numpy() for x in batches])
            for actor in self.actors:
                ref = actor.calibrate_batchnorm.remote(ref)
            ray.get(ref)

        self._recovering(call)

    def layer_outputs(self, x: Tensor) -> list[Tensor]:
        def call():
            ref, views = ray.put(x.numpy()), []
            for actor in self.actors:
                ref, stage_views = actor.layer_outputs.options(num_returns=2).remote(ref)
                views.append(stage_views)
            return [torch.from_numpy(np.array(view)) for stage in ray.get(views) for view in stage]

        return self._recovering(call)

    def measure(self, x: Tensor, factors: KernelFactors) -> Tensor:
        def call():
            ref, target_ref = ray.put(x.numpy()), ray.put(factors_to_numpy(factors))
            stats = []
            for actor in self.actors:
                ref, stage_stats = actor.measure.options(num_returns=2).remote(ref, target_ref)
                stats.append(stage_stats)
            return torch.from_numpy(np.concatenate(ray.get(stats)))

        return self._recovering(call)

    def save(self, run: RunDirectory, step: int) -> None:
        # A stage recreated meanwhile saves the state it was restored to, as it trains on from it.
        self._recovering(lambda: ray.get([actor.save.remote(run.location, step) for actor in self.actors]))
        self._restore_point = (run.location, step)

    def load(self, run: RunDirectory, step: int) -> None:
        ray.get([actor.load.remote(run.location, step) for actor in self.actors])
        self._restore_point = (run.location, step)

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        if self._owns_group:
            ray.util.remove_placement_group(self._group)

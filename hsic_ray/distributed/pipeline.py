"""The Ray pipeline: stage actors chained by object refs, with failed stages recreated from checkpoints.

`submit` puts a batch and its targets into the object store once and chains `stage[s].step` calls, each
taking the previous stage's output ref: Ray's ordered actor queues then run stage s on batch b while stage
s + 1 runs on batch b - 1, and activations move from actor to actor without passing through the driver.

When a stage actor dies (its process killed, its node lost), `result` recreates it in its placement
bundle from the latest checkpoint and resends the batches it lost, from the first stage that failed.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import ray
import torch
from ray.exceptions import ObjectLostError, OwnerDiedError, RayActorError
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from torch import Tensor

from hsic_ray.config import ExperimentConfig
from hsic_ray.distributed.placement import StageSpec, describe_plan, reserve
from hsic_ray.distributed.stage_actor import StageActor, targets_to_numpy
from hsic_ray.models import Shape
from hsic_ray.objective import BatchTargets
from hsic_ray.run_dir import RunDirectory
from hsic_ray.trainer import StepResult

log = logging.getLogger("hsic_ray")

# Failures after which a stage is recreated and its lost batches resent.
_LOST = (RayActorError, ObjectLostError, OwnerDiedError)


class PipelineFailed(RuntimeError):
    """Stages kept failing after `ray.max_recoveries` recoveries."""


@dataclass
class _Handle:
    """One batch in flight: its inputs in the object store and each stage's output and report refs."""

    x: ray.ObjectRef
    targets: ray.ObjectRef
    outputs: list = field(default_factory=list)
    reports: list = field(default_factory=list)


class RayPipeline:
    def __init__(self, cfg: ExperimentConfig, specs: list[StageSpec], input_shape: Shape, num_classes: int):
        self.cfg = cfg
        self.specs = specs
        self.num_stages = len(specs)
        self.max_in_flight = cfg.ray.max_in_flight or self.num_stages + 1
        self._actor_args = (cfg, tuple(input_shape), num_classes)
        self._group, self._owns_group = reserve(specs, cfg.ray)
        self._restore_point: Optional[tuple[str, int]] = None
        self._events: list[dict[str, Any]] = []
        self._recoveries = 0
        self.actors = [self._start(spec) for spec in specs]
        self.placements = ray.get([a.where.remote() for a in self.actors])
        log.info("pipeline plan (%d stages, %d in flight):\n%s", self.num_stages, self.max_in_flight,
                 describe_plan(specs, self.placements))  # fmt: skip

    def _start(self, spec: StageSpec) -> ray.actor.ActorHandle:
        strategy = PlacementGroupSchedulingStrategy(self._group, placement_group_bundle_index=spec.index + 1)
        return StageActor.options(
            num_cpus=spec.num_cpus, num_gpus=spec.num_gpus, scheduling_strategy=strategy
        ).remote(spec, *self._actor_args, restore=self._restore_point)

    # --- training -------------------------------------------------------------------------------------

    def submit(self, x: Tensor, targets: BatchTargets) -> _Handle:
        handle = _Handle(ray.put(x.numpy()), ray.put(targets_to_numpy(targets)))
        self._chain(handle, first_stage=0)
        return handle

    def _chain(self, handle: _Handle, first_stage: int) -> None:
        del handle.outputs[first_stage:], handle.reports[first_stage:]
        inputs = handle.x if first_stage == 0 else handle.outputs[first_stage - 1]
        for actor in self.actors[first_stage:]:
            inputs, report = actor.step.options(num_returns=2).remote(inputs, handle.targets)
            handle.outputs.append(inputs)
            handle.reports.append(report)

    def result(self, handle: _Handle, want_output: bool, read_back: bool = True) -> StepResult:
        # Stage reports are host data already (each actor checks its own health every step): read_back is moot.
        for _ in range(self.cfg.ray.max_recoveries + 1):
            try:
                reports = ray.get(handle.reports)
                output = torch.from_numpy(np.array(ray.get(handle.outputs[-1]))) if want_output else None
            except _LOST as err:
                self._recover(err)
                self._chain(handle, self._first_failed_stage(handle))
                continue
            stats = torch.from_numpy(np.concatenate([r["stats"] for r in reports]))
            return StepResult(stats, output, [(r["busy"], r["idle"]) for r in reports])
        raise PipelineFailed(f"a batch failed {self.cfg.ray.max_recoveries + 1} times in a row; see the Ray logs")

    def _first_failed_stage(self, handle: _Handle) -> int:
        for stage, report in enumerate(handle.reports):
            try:
                ray.get(report)
            except RayActorError:
                return stage
            except (ObjectLostError, OwnerDiedError):
                return 0  # an input the stage needed is gone with its node: resend the batch from the start
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
            self.actors[stage] = self._start(self.specs[stage])
            self.placements[stage] = ray.get(self.actors[stage].where.remote())
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
            log.warning("stage %d died (%s); recreated from checkpoint step %s on %s in %.1fs",
                        stage, event["error"], restored, event["node_ip"], event["seconds"])  # fmt: skip

    def events(self) -> list[dict[str, Any]]:
        events, self._events = self._events, []
        return events

    # --- evaluation and checkpoints -------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        ref = ray.put(x.numpy())
        for actor in self.actors:
            ref = actor.forward.remote(ref)
        return torch.from_numpy(np.array(ray.get(ref)))

    def measure(self, x: Tensor, targets: BatchTargets) -> Tensor:
        ref, target_ref = ray.put(x.numpy()), ray.put(targets_to_numpy(targets))
        stats = []
        for actor in self.actors:
            ref, stage_stats = actor.measure.options(num_returns=2).remote(ref, target_ref)
            stats.append(stage_stats)
        return torch.from_numpy(np.concatenate(ray.get(stats)))

    def save(self, run: RunDirectory, step: int) -> None:
        ray.get([actor.save.remote(run.location, step) for actor in self.actors])
        self._restore_point = (run.location, step)

    def load(self, run: RunDirectory, step: int) -> None:
        ray.get([actor.load.remote(run.location, step) for actor in self.actors])
        self._restore_point = (run.location, step)

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        if self._owns_group:
            ray.util.remove_placement_group(self._group)

"""The Ray pipeline: batches grouped, launched into the object store and chained through the stage actors.

`submit` gathers consecutive batches into groups of `ray.batches_per_call`; a full group goes into the
object store once (inputs, and factors or labels) and a chain of `stage[s].step` calls, each taking the
previous stage's `Hop` ref and the group's factors: Ray's ordered actor queues then run stage s on group g
while stage s + 1 runs on group g - 1, and activations move from actor to actor without passing through
the driver. Since no stage feeds back to an earlier one, every stage sees the same inputs in the same order
as in the in-process trainer, whatever the number of batches in flight or per call: the results are the
same. `result` fetches one small object per group, the reports the last stage returns.

Each batch's factors (`ray.factors_on`) are computed once for every stage: by the coordinator on its CPU
(a thread of the training loop computes them ahead), or by the first stage on its device, in its step
call from the group's inputs and labels, which returns them as one more object for the stages after it.
With stages on GPUs the coordinator's CPU would be the slowest part of the pipeline (docs/design.md, "The
Ray pipeline").

The actors' lifecycle and recovery are `hsic_ray.distributed.stages`; when a stage dies, `result` resends
the groups it lost, from the first stage that failed. The batches per call are chosen by
`hsic_ray.distributed.batches_per_call`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
import torch
from ray.exceptions import RayActorError
from torch import Tensor

from hsic_ray.config import ExperimentConfig
from hsic_ray.data import Batch
from hsic_ray.distributed.batches_per_call import BatchesPerCall
from hsic_ray.distributed.placement import StageSpec, describe_plan, gpu_sharing_advice
from hsic_ray.distributed.stage_actor import Hop, StageSettings
from hsic_ray.distributed.stages import LOST, Stages
from hsic_ray.distributed.transport import WireFactors, factors_to_numpy
from hsic_ray.machine import threads_for
from hsic_ray.models import Shape
from hsic_ray.objective import KernelFactors
from hsic_ray.pipeline import StepResult
from hsic_ray.run.directory import RunDirectory
from hsic_ray.schedule import LRSchedule

log = logging.getLogger("hsic_ray")


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
    """The `hsic_ray.pipeline.Pipeline` of stage actors on a Ray cluster."""

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
        flight (`BatchesPerCall`); None for a loop that never waits."""
        self.cfg = cfg
        self.num_stages = len(specs)
        self.factors_on = cfg.ray.factors_on or ("first_stage" if specs[0].num_gpus > 0 else "coordinator")
        # A coordinator that computes factors mostly waits for the stages: factors computed meanwhile in a
        # thread cost nothing. None: the loop hands over labels, for the first stage.
        self.factors_device = torch.device("cpu") if self.factors_on == "coordinator" else None
        self.prefetch_factors = self.factors_on == "coordinator"
        # Kept to its own CPUs while the stages train, so that it does not fight the stage actors for cores.
        self.coordinator_threads = threads_for(cfg.ray.coordinator_cpus)
        self._batches_per_call = BatchesPerCall(cfg.ray, self.num_stages, drain_every)
        self._events: list[dict[str, Any]] = []
        self._filling = _Group()
        self.stages = Stages(specs, cfg.ray, StageSettings.for_run(cfg, input_shape, num_classes, schedule))
        log.info(
            "pipeline plan (%d stages, %d in flight, factors on the %s):\n%s",
            self.num_stages,
            self.max_in_flight,
            self.factors_on.replace("_", " "),
            describe_plan(specs, self.placements),
        )
        if advice := gpu_sharing_advice(self.placements):
            log.warning(advice)

    @property
    def batches_per_call(self) -> int:
        return self._batches_per_call.value

    @property
    def max_in_flight(self) -> int:
        return self._batches_per_call.max_in_flight

    @property
    def settled(self) -> bool:
        """Whether the batches per call (and so the in-flight bound) are final: set, or chosen already."""
        return self._batches_per_call.settled

    @property
    def placements(self) -> list[dict[str, Any]]:
        return self.stages.placements

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
        actor, last = self.stages.actors[stage], stage == self.num_stages - 1
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
        transfer, factors = ([r[part] / size for r in group.reports] for part in ("transfer", "factors"))
        return StepResult(stats, output, seconds, transfer, factors)

    def _fetch(self, group: _Group) -> None:
        def resend() -> None:
            self._chain(group, _first_failed_stage(group))

        group.reports = self.stages.retrying(lambda: ray.get(group.reports_ref), "a batch", resend)
        chosen = self._batches_per_call.record(group.reports)
        if chosen is not None:
            self._events.append(chosen)

    def events(self) -> list[dict[str, Any]]:
        events, self._events = self._events + self.stages.events(), []
        return events

    # --- evaluation and checkpoints -------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        return torch.from_numpy(np.array(self.stages.through("forward", x.numpy())))

    def calibrate_batchnorm(self, batches: list[Tensor]) -> None:
        """One batch per request, the stages overlapped (`Stages.through_each`), each request continuing the
        average of the one before; all of them at once again if a stage was recreated meanwhile, since it
        holds only part of the average."""
        arrays, recoveries = [x.numpy() for x in batches], self.stages.recoveries
        self.stages.through("calibrate_batchnorm", arrays[:1], True)
        for _ in self.stages.through_each("calibrate_batchnorm", ([x] for x in arrays[1:]), self.num_stages + 1):
            pass
        if self.stages.recoveries != recoveries:
            self.stages.through("calibrate_batchnorm", arrays, True)

    def forward_chunks(self, chunks: Iterable[Tensor]) -> Iterator[Tensor]:
        outputs = self.stages.through_each("forward", (x.numpy() for x in chunks), window=self.num_stages + 1)
        return (torch.from_numpy(np.array(out)) for out in outputs)

    def layer_outputs(self, chunks: Iterable[Tensor], max_features: int) -> Iterator[list[Tensor]]:
        arrays = (x.numpy() for x in chunks)
        window = self.num_stages + 1
        for views in self.stages.through_each("layer_outputs", arrays, window, True, args=(max_features,)):
            yield [torch.from_numpy(np.array(view)) for stage in views for view in stage]

    def measure(self, x: Tensor, factors: KernelFactors) -> Tensor:
        stats = self.stages.through("measure", x.numpy(), factors_to_numpy(factors), side_outputs=True)
        return torch.from_numpy(np.concatenate(stats))

    def save(self, run: RunDirectory, step: int) -> None:
        self.stages.save(run.location, step)

    def load(self, run: RunDirectory, step: int) -> None:
        self.stages.load(run.location, step)

    def shutdown(self) -> None:
        self.stages.shutdown()


def _first_failed_stage(group: _Group) -> int:
    """The first stage to call again on `group` after a recovery."""
    try:
        ray.get(group.factors)
    except LOST:
        return 0  # the first stage died computing them, or they are gone with its node
    for stage, hop in enumerate(group.hops):
        try:
            ray.get(hop)
        except RayActorError:
            return stage
        except LOST:
            return 0  # an input the stage needed is gone with its node: resend the group from the start
    return len(group.hops) - 1

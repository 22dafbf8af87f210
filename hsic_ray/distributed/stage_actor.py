"""A Ray actor that owns one stage: a contiguous run of layers, their optimizer and its device.

A call carries a group of consecutive batches (`ray.batches_per_call`), so Ray's fixed cost per call is
paid once per group: the stage runs its ordinary step on each batch in turn, which gives the same
weights as one call per batch. What travels from stage to stage is a `Hop`: the group's activations and
the reports of the stages before, so the coordinator collects one small object per group from the last
stage instead of one report per stage. Arrays cross devices in `hsic_ray.distributed.transport`.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import ray
import torch

from hsic_ray import interrupt
from hsic_ray.config import ExperimentConfig, HSICConfig, ModelConfig, OptimConfig
from hsic_ray.distributed.placement import StageSpec
from hsic_ray.distributed.transport import Transport, WireFactors
from hsic_ray.machine import keep_freed_memory, mps_running, threads_for
from hsic_ray.models import Shape, build_network
from hsic_ray.objective import HSICObjective, KernelFactors, factor_group_size
from hsic_ray.run import checkpoint
from hsic_ray.run.directory import RunDirectory
from hsic_ray.schedule import LRSchedule
from hsic_ray.stage_step import StageStep, layer_lr_scales


@dataclass(frozen=True)
class StageSettings:
    """What every stage actor of a run is built from: the run's config sections a stage uses, and the data's
    shape."""

    model: ModelConfig
    num_hsic_layers: int  # in the whole network: each stage weighs its layers by their place in it
    hsic: HSICConfig
    optim: OptimConfig
    seed: int
    cuda_graphs: str
    input_shape: Shape
    num_classes: int
    schedule: LRSchedule | None = None
    factor_group: int | None = None  # train.factor_group: a first stage computing factors does so in such groups

    @classmethod
    def for_run(
        cls, cfg: ExperimentConfig, input_shape: Shape, num_classes: int, schedule: LRSchedule | None = None
    ) -> StageSettings:
        return cls(
            model=cfg.model,
            num_hsic_layers=cfg.num_hsic_layers,
            hsic=cfg.hsic,
            optim=cfg.optim,
            seed=cfg.train.seed,
            cuda_graphs=cfg.train.cuda_graphs,
            input_shape=tuple(input_shape),
            num_classes=num_classes,
            schedule=schedule,
            factor_group=cfg.train.factor_group,
        )


class Hop(NamedTuple):
    """What a stage passes on: a group's activations, and one report per stage so far."""

    activations: list[np.ndarray]
    reports: list[dict[str, Any]]


@ray.remote
class StageActor:
    def __init__(self, spec: StageSpec, settings: StageSettings, restore: tuple[str, int] | None = None):
        interrupt.worker_exits_quietly()
        torch.set_num_threads(threads_for(spec.num_cpus))
        keep_freed_memory()
        self.spec = spec
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.transport = Transport(self.device)
        self.stage_step = _build_stage_step(spec, settings, self.device)
        self.factor_group = settings.factor_group
        self._last_end: float | None = None
        if restore is not None:
            self.load(*restore)

    def step(self, hop: Hop, factors: list[WireFactors]) -> Hop:
        """One local HSIC step of this stage's layers on each batch of the group, in order. On a GPU the
        batches' copies and steps are queued back to back, and the call waits for the device once."""
        return self._steps(hop, factors=factors)[0]

    def step_last(self, hop: Hop, factors: list[WireFactors]) -> tuple[list[np.ndarray], list[dict[str, Any]]]:
        """`step` for the last stage: output and reports as two objects, so the coordinator can fetch the
        small one alone."""
        return tuple(self.step(hop, factors))

    def step_first(self, hop: Hop, labels: list[np.ndarray], last: bool) -> tuple:
        """`step` for a first stage that computes every stage's factors on its device (ray.factors_on=
        first_stage): from each batch's inputs, received once for both, and labels. It steps on them where
        they are, and returns them for the stages after it as one more object: (hop, factors), or
        (outputs, reports, factors) when it is also the last stage."""
        out, factors = self._steps(hop, labels=labels)
        return (*out, factors) if last else (out, factors)

    def _steps(
        self, hop: Hop, factors: list[WireFactors] | None = None, labels: list[np.ndarray] | None = None
    ) -> tuple[Hop, list[WireFactors] | None]:
        """The group's steps on the given `factors`, or on factors computed here from `labels` (then also
        returned, for the wire)."""
        started = time.perf_counter()
        idle = 0.0 if self._last_end is None else max(0.0, started - self._last_end)
        xs = [self.transport.receive(x, f"x{slot}") for slot, x in enumerate(hop.activations)]
        if labels is None:
            batch_factors = [self.transport.receive_factors(wire, slot) for slot, wire in enumerate(factors)]
        else:
            ys = [self.transport.receive(y, f"y{slot}") for slot, y in enumerate(labels)]
        transfer = time.perf_counter() - started
        factor_clock = DeviceClock(self.device)
        if labels is not None:
            with factor_clock.timing():
                batch_factors = self._kernel_factors(xs, ys)
        results = [self.stage_step.train_step(x, f) for x, f in zip(xs, batch_factors)]
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the copies back wait for the steps anyway: time them apart
        moved = time.perf_counter()
        outputs = self.transport.send([out for out, _ in results])
        stats = torch.stack([layer_stats for _, layer_stats in results]).cpu().numpy()
        wire = self.transport.send_factors(batch_factors) if labels is not None else None
        transfer += time.perf_counter() - moved
        self.stage_step.check_solves()  # the copies above synchronised already: checking costs nothing more
        self._last_end = time.perf_counter()
        report = {
            "stage": self.spec.index,
            "stats": stats,
            "busy": self._last_end - started,
            "idle": idle,
            "transfer": transfer,
            "factors": factor_clock.seconds(),  # read after the device was waited for above
        }
        return Hop(outputs, hop.reports + [report]), wire

    def _kernel_factors(self, xs: list[torch.Tensor], ys: list[torch.Tensor]) -> list[KernelFactors]:
        """The group's factors, `train.factor_group` batches in each call (`factor_group_size`)."""
        size = factor_group_size(self.factor_group, self.device, len(ys[0]))
        objective = self.stage_step.objective
        return [
            f
            for i in range(0, len(xs), size)
            for f in objective.group_kernel_factors(xs[i : i + size], ys[i : i + size])
        ]

    def forward(self, x: np.ndarray) -> np.ndarray:
        self._last_end = None  # evaluation breaks the stream: the next step's wait is not pipeline idle
        return self.stage_step.forward(self.transport.receive(x)).cpu().numpy()

    def calibrate_batchnorm(self, batches: list[np.ndarray], reset: bool = False) -> list[np.ndarray]:
        """`StageStep.calibrate_batchnorm`; `reset` only on the first of a calibration's requests."""
        self._last_end = None
        outputs = self.stage_step.calibrate_batchnorm([self.transport.receive(x) for x in batches], reset)
        return [out.cpu().numpy() for out in outputs]

    def layer_outputs(self, x: np.ndarray, max_features: int) -> tuple[np.ndarray, list[np.ndarray]]:
        """The stage's eval-mode output (for the next stage) and its layers' probe views (for the driver)."""
        self._last_end = None
        out, views = self.stage_step.layer_outputs(self.transport.receive(x), max_features)
        return out.cpu().numpy(), [view.cpu().numpy() for view in views]

    def measure(self, x: np.ndarray, factors: WireFactors) -> tuple[np.ndarray, np.ndarray]:
        self._last_end = None
        out, stats = self.stage_step.measure(self.transport.receive(x), self.transport.receive_factors(factors))
        return out.cpu().numpy(), stats.cpu().numpy()

    def save(self, run_location: str, step: int) -> None:
        run = RunDirectory(run_location)
        checkpoint.save_state(run, checkpoint.stage_file(step, self.spec.index), self.stage_step.state_dict())

    def load(self, run_location: str, step: int) -> None:
        run = RunDirectory(run_location)
        self.stage_step.load_state_dict(checkpoint.load_state(run, checkpoint.stage_file(step, self.spec.index)))

    def where(self) -> dict[str, Any]:
        context = ray.get_runtime_context()
        return {
            "node_id": context.get_node_id(),
            "node_ip": ray.util.get_node_ip_address(),
            "pid": os.getpid(),
            "device": str(self.device),
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
            "mps": self.device.type == "cuda" and mps_running(),
            "layers": [self.spec.start, self.spec.stop],
        }


class DeviceClock:
    """Seconds of some parts of a call's work: host time on a CPU; on a GPU, where the call queues its work and
    waits for the device once, the device's time between CUDA events around each part, read after that wait."""

    def __init__(self, device: torch.device):
        self._cuda = device.type == "cuda"
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._host_seconds = 0.0

    @contextlib.contextmanager
    def timing(self) -> Iterator[None]:
        if self._cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events.append((start, end))
            return
        started = time.perf_counter()
        yield
        self._host_seconds += time.perf_counter() - started

    def seconds(self) -> float:
        """The parts' total; on a GPU only once the device has done them (after a synchronize)."""
        return self._host_seconds + sum(start.elapsed_time(end) for start, end in self._events) / 1e3


def _build_stage_step(spec: StageSpec, settings: StageSettings, device: torch.device) -> StageStep:
    # Every stage builds the whole network from the run's seed and keeps its slice, so the initial weights
    # equal the in-process trainer's without shipping them through the driver.
    torch.manual_seed(settings.seed)
    layers = list(build_network(settings.model, settings.input_shape).layers)[spec.start : spec.stop]
    num_layers = settings.num_hsic_layers
    objective = HSICObjective(settings.hsic, settings.num_classes, spec.layers, num_layers)
    lr_scales = layer_lr_scales(settings.hsic.lr_scale_last, spec.layers, num_layers)
    return StageStep(layers, objective, settings.optim, device, settings.cuda_graphs, lr_scales, settings.schedule)

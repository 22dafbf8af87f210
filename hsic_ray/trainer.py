"""The HSIC training loop, independent of where the layers run.

The loop reads batches, computes each batch's factors once, hands batch and factors to a `Pipeline`
(every layer in this process, or stage actors on Ray) and bounds how many batches are in flight. After each
epoch it recalibrates BatchNorm and looks at every layer (hsic_ray.layer_monitor); it checkpoints and resumes
through hsic_ray.training_state, and hands the trained network to hsic_ray.run_end. On SIGINT or SIGTERM
(hsic_ray.interrupt) it stops after the batch it submitted last: the batches in flight finish, a checkpoint
is written there, and the run ends with `Interrupted`, to be continued from that checkpoint with nothing lost.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from hsic_ray import interrupt
from hsic_ray.config import ExperimentConfig, TrainConfig
from hsic_ray.data import Batch, ImageData, iterate_batches, num_batches, to_tensor
from hsic_ray.final_pass import FinalPass
from hsic_ray.head import FormatHead
from hsic_ray.layer_monitor import LayerMonitor
from hsic_ray.monitor_schedule import MonitorSchedule
from hsic_ray.network_evaluation import NetworkEvaluation
from hsic_ray.objective import HSICObjective, KernelFactors, factor_group_size
from hsic_ray.pipeline import Pipeline, StepResult
from hsic_ray.prefetch import prefetched
from hsic_ray.run.directory import RunDirectory
from hsic_ray.run.metrics_log import MetricsLog
from hsic_ray.run_end import RunEnd
from hsic_ray.timeline import Timeline
from hsic_ray.training_state import Position, Progress, TrainingCheckpoints

log = logging.getLogger("hsic_ray")


@dataclass
class _InFlight:
    batch: Batch
    handle: Any


@dataclass
class _Clock:
    """Wall time and batches finished since the epoch (or the last checkpoint pause) began."""

    started: float
    finished: int = 0

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started


class HSICTrainer:
    def __init__(
        self,
        cfg: ExperimentConfig,
        data: ImageData,
        pipeline: Pipeline,
        output_features: int,
        run: RunDirectory | None = None,
        device: torch.device | str = "cpu",
        on_epoch: Callable[[dict[str, Any]], None] | None = None,
        timeline: Timeline | None = None,
    ):
        """`on_epoch`, if given, receives after each HSIC epoch its information-plane record plus the test
        accuracies at that point, unformatted and least squares (`NetworkEvaluation.epoch_accuracies`; e.g.
        to report to Ray Tune). `timeline` times the run's phases (metrics.json's `phase_seconds`)."""
        self.cfg, self.train = cfg, cfg.train
        self.data, self.pipeline, self.on_epoch = data, pipeline, on_epoch
        self.timeline = timeline or Timeline()
        self.out = MetricsLog(run, tensorboard=cfg.train.tensorboard, timeline=self.timeline)
        self.objective = HSICObjective(cfg.hsic, data.num_classes)
        self.head = FormatHead(output_features, data.num_classes, cfg.head, device)
        self.monitor = LayerMonitor(cfg.train, data, self.objective, pipeline, self.out, cfg.preset or "hsic")
        self.schedule = MonitorSchedule(cfg.train)
        self.evaluation = NetworkEvaluation(
            data, pipeline.forward_chunks, cfg.train.readout_samples, seed=cfg.train.seed + 3
        )
        self.progress = Progress.of_stages(pipeline.num_stages)
        self.checkpoints = TrainingCheckpoints(
            cfg.train, run, pipeline, self.out, self.progress, self.head, self.monitor
        )
        final_pass = FinalPass(cfg.train, data, pipeline, output_features, self.timeline)
        self.run_end = RunEnd(cfg, data, final_pass, self.evaluation, self.head, self.monitor, self.out, run)
        self._batches_per_epoch = num_batches(len(data.y_train), cfg.train.batch_size)

    def fit(self, resume_step: int | None = None) -> dict[str, Any]:
        """HSIC epochs, then the end of the run (hsic_ray.run_end); returns its metrics.

        With `resume_step`, training continues from that checkpoint of the run directory.
        """
        try:
            return self._fit(resume_step)
        finally:
            self.out.close()

    def _fit(self, resume_step: int | None) -> dict[str, Any]:
        self.out.write("placements.json", self.pipeline.placements)
        if resume_step is None:
            position = Position()
            if self.schedule.due(0, last=False, train_seconds=0.0):
                self.monitor.record(epoch=0, step=0)
        else:
            position = self.checkpoints.restore(resume_step)
        with interrupt.at_safe_points():  # SIGINT / SIGTERM: stop at the next batch, after a checkpoint
            while position.epoch <= self.train.epochs and not self._step_budget_spent():
                with self.timeline.phase("train"), torch_threads(self.pipeline.coordinator_threads):
                    self._train_epoch(position)
                last = position.epoch == self.train.epochs or self._step_budget_spent()
                self._end_epoch(position.epoch, last)
                position = Position(position.epoch + 1, 0)
            if resume_step is None or self.progress.steps > resume_step:
                self.checkpoints.save(position)
            interrupt.stop_if_requested(self.progress.steps)
        return self.run_end.finish(self.progress.summary(self.train.batch_size))

    def _step_budget_spent(self) -> bool:
        return self.train.max_steps is not None and self.progress.steps >= self.train.max_steps

    # --- an epoch --------------------------------------------------------------------------------------

    def _train_epoch(self, position: Position) -> None:
        pending: collections.deque[_InFlight] = collections.deque()
        clock = _Clock(time.perf_counter())
        for batch, factors in self._batches_with_factors(position):
            if self._step_budget_spent():
                break
            pending.append(_InFlight(batch, self.pipeline.submit(batch, factors)))
            self.progress.steps += 1  # counted when submitted, so max_steps bounds what is started
            while len(pending) >= self.pipeline.max_in_flight:
                self._finish(pending.popleft(), len(pending), clock)
            if self.checkpoints.due() or interrupt.requested():
                while pending:  # a checkpoint holds every stage at the same step
                    self._finish(pending.popleft(), len(pending), clock)
                self.progress.train_seconds += clock.seconds
                self.checkpoints.save(Position(position.epoch, batch.index + 1))
                interrupt.stop_if_requested(self.progress.steps)  # SIGINT / SIGTERM: end here, nothing lost
                clock = _Clock(time.perf_counter())
        while pending:
            self._finish(pending.popleft(), len(pending), clock)
        self.progress.train_seconds += clock.seconds

    def _batches_with_factors(self, position: Position) -> Iterator[tuple[Batch, KernelFactors]]:
        train = self.train
        batches = iterate_batches(
            self.data.x_train, self.data.y_train, train.batch_size, train.seed, position.epoch, start=position.batch
        )
        group = loop_factor_group(self.pipeline, train.factor_group, train.batch_size)
        return with_factors(batches, self.objective.group_kernel_factors, self.pipeline, group)

    def _end_epoch(self, epoch: int, last: bool) -> None:
        """The epoch's monitors where the schedule (hsic_ray.monitor_schedule) has them. After every epoch for
        `on_epoch`, which reports the information plane and the readouts: the probes, which it does not
        report, still keep to the schedule."""
        scheduled = self.schedule.due(epoch, last, self.progress.train_seconds)
        if not (scheduled or self.on_epoch is not None):
            return
        started = time.perf_counter()
        # BatchNorm statistics of the weights as they are now, before anything reads the network in eval mode
        # (see StageStep.calibrate_batchnorm).
        if self.train.bn_calibration_batches:
            with self.timeline.phase("calibration"):
                self.pipeline.calibrate_batchnorm(batchnorm_calibration_batches(self.data.x_train, self.train))
        self.monitor.record(epoch, self.progress.steps, probes=scheduled)
        if scheduled:  # a reporting run's extra rounds leave out the probes: their cost says nothing of a full one
            self.schedule.ran(time.perf_counter() - started)
        if self.on_epoch is not None:
            summary = dict(self.monitor.info_plane[-1], train_seconds=self.progress.train_seconds)
            with self.timeline.phase("epoch_readout"):
                accuracies = self.evaluation.epoch_accuracies()
            self.on_epoch({**summary, **accuracies})

    # --- a step ----------------------------------------------------------------------------------------

    def _finish(self, item: _InFlight, in_flight: int, clock: _Clock) -> None:
        done = item.batch.index + 1
        log_now = done % self.train.log_every == 0 or done == self._batches_per_epoch
        result = self.pipeline.result(item.handle, want_output=self.cfg.head.concurrent, read_back=log_now)
        if result.output is not None:
            self.head.step(result.output, item.batch.y)
        if result.stage_seconds:
            self.progress.add_stage_seconds(result.stage_seconds)
        self._record_events()
        clock.finished += 1
        if log_now:
            rate = clock.finished * self.train.batch_size / max(clock.seconds, 1e-9)
            self._log_step(item.batch, result, in_flight + 1, rate)

    def _record_events(self) -> None:
        for event in self.pipeline.events():
            self.out.append({**event, "step": self.progress.steps})
            if event["kind"] == "recovery":
                self.progress.recoveries += 1
                self.out.write("placements.json", self.pipeline.placements)

    def _log_step(self, batch: Batch, result: StepResult, in_flight: int, rate: float) -> None:
        stats = result.layer_stats.cpu()
        total, done = self._batches_per_epoch, batch.index + 1
        record = {
            "kind": "step",
            "epoch": batch.epoch,
            "step": (batch.epoch - 1) * total + done,  # the step these statistics are from (others may be in flight)
            "loss": float(stats[:, 0].sum()),
            "nhsic_zx": stats[:, 1].tolist(),
            "nhsic_zy": stats[:, 2].tolist(),
            "samples_per_second": rate,
            "in_flight": in_flight,
            **self.progress.stage_time(),
        }
        self.out.append(record)
        log.info(
            "epoch %d/%d  batch %d/%d  step %d  loss %.4g  nHSIC(Z,X) %.3g  nHSIC(Z,Y) %.3g (last layer)  "
            "%.0f samples/s  epoch eta %.0fs",
            batch.epoch,
            self.train.epochs,
            done,
            total,
            record["step"],
            record["loss"],
            stats[-1, 1],
            stats[-1, 2],
            rate,
            (total - done) * self.train.batch_size / max(rate, 1e-9),
        )


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op threads set to `threads` (None: left as they are) for the body, then restored."""
    saved = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def batches_between_drains(train: TrainConfig, train_samples: int, seconds_per_batch: float) -> int:
    """Batches between the loop's waits for every batch in flight, for batches that take `seconds_per_batch`:
    at each epoch's end (the information plane, probes and BatchNorm statistics read a finished network) and
    at each checkpoint."""
    intervals = [num_batches(train_samples, train.batch_size)]
    if train.checkpoint_every:
        intervals.append(train.checkpoint_every)
    if train.checkpoint_seconds:
        intervals.append(max(1, int(train.checkpoint_seconds / max(seconds_per_batch, 1e-9))))
    return min(intervals)


def batchnorm_calibration_batches(x_train: np.ndarray, train: TrainConfig) -> list[Tensor]:
    """The fixed, seeded training batches each epoch's BatchNorm statistics are computed from:
    `train.bn_calibration_batches` batches of `train.batch_size` (fewer when the split is smaller)."""
    count, size, n = train.bn_calibration_batches, train.batch_size, len(x_train)
    order = np.random.default_rng(train.seed + 1).permutation(n)[: min(n, count * size)]
    return [to_tensor(x_train[np.sort(chunk)]) for chunk in np.array_split(order, max(1, len(order) // size))]


def loop_factor_group(pipeline: Pipeline, setting: int | None, batch_size: int) -> int:
    """How many batches' factors the loop computes in one call (`with_factors`): `train.factor_group` on the
    pipeline's `factors_device`; 1 where the pipeline computes them itself."""
    device = pipeline.factors_device
    return 1 if device is None else factor_group_size(setting, device, batch_size)


def with_factors(
    batches: Iterable[Batch],
    group_factors: Callable[[list[Tensor], list[Tensor]], list[KernelFactors]],
    pipeline: Pipeline,
    group: int = 1,
) -> Iterator[tuple[Batch, KernelFactors | None]]:
    """Each batch on the pipeline's `factors_device` with its factors, computed `group` batches at a time
    (`group_factors(xs, labels)`, as `HSICObjective.group_kernel_factors`) and ahead in a thread where the
    pipeline asks for it; None where the pipeline computes them itself."""
    if pipeline.factors_device is None:
        return ((batch, None) for batch in batches)
    device = pipeline.factors_device

    def prepare(members: list[Batch]) -> list[tuple[Batch, KernelFactors]]:
        moved = [batch.to(device) for batch in members]
        return list(zip(moved, group_factors([b.x for b in moved], [b.y for b in moved])))

    groups = _groups(batches, group)
    if pipeline.prefetch_factors:
        return _each(prefetched(groups, prepare, depth=max(1, pipeline.max_in_flight // group)))
    return _each(map(prepare, groups))


def _groups(items: Iterable[Batch], size: int) -> Iterator[list[Batch]]:
    iterator = iter(items)
    while group := list(itertools.islice(iterator, size)):
        yield group


def _each(groups: Iterator[list[tuple[Batch, KernelFactors]]]) -> Iterator[tuple[Batch, KernelFactors]]:
    """The groups' items in order; closing this closes `groups` (a prefetching thread stops)."""
    try:
        for items in groups:
            yield from items
    finally:
        getattr(groups, "close", lambda: None)()

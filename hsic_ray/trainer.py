"""The HSIC training loop, independent of where the layers run.

The loop reads batches, computes each batch's factors once, hands batch and factors to a `Pipeline`
(every layer in this process, or stage actors on Ray) and bounds how many batches are in flight. Around
it, a run checkpoints, looks at every layer after each epoch (hsic_ray.layer_monitor), and at the end
trains the format head and reads the network (hsic_ray.readout).
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from hsic_ray.config import ExperimentConfig, TrainConfig
from hsic_ray.data import Batch, ImageData, iterate_batches, num_batches, to_tensor
from hsic_ray.head import FormatHead
from hsic_ray.layer_monitor import LayerMonitor
from hsic_ray.objective import HSICObjective, KernelFactors
from hsic_ray.pipeline import Pipeline
from hsic_ray.prefetch import prefetched
from hsic_ray.readout import Readout
from hsic_ray.run import checkpoint
from hsic_ray.run.directory import RunDirectory
from hsic_ray.run.metrics_log import MetricsLog
from hsic_ray.run.model_io import MODEL_FILE, model_bytes

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


@dataclass
class _Position:
    """Where training stands: the next batch to submit."""

    epoch: int = 1
    batch: int = 0


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
    ):
        """`on_epoch`, if given, receives after each HSIC epoch its information-plane record plus the test
        accuracies at that point, unformatted and of a least-squares linear readout (e.g. to report to Ray
        Tune)."""
        self.cfg = cfg
        self.on_epoch = on_epoch
        self.data = data
        self.pipeline = pipeline
        self.run = run
        self.out = MetricsLog(run, tensorboard=cfg.train.tensorboard)
        self.objective = HSICObjective(cfg.hsic, data.num_classes)
        self.head = FormatHead(output_features, data.num_classes, cfg.head, device)
        self.monitor = LayerMonitor(cfg, data, self.objective, pipeline, self.out)
        self.readout = Readout(cfg, data, pipeline.forward, self.head)
        self.steps = 0
        self.train_seconds = 0.0
        self.checkpoint_write_seconds = 0.0  # writing checkpoints (train_seconds leaves it out)
        self.recoveries = 0
        self._batches_per_epoch = num_batches(len(data.y_train), cfg.train.batch_size)
        self._stage_seconds = [[0.0, 0.0] for _ in range(pipeline.num_stages)]
        self._checkpointed_at = time.perf_counter()  # or when this process started training

    # --- the run ---------------------------------------------------------------------------------------

    def fit(self, resume_step: int | None = None) -> dict[str, Any]:
        """HSIC epochs, then the format head on the frozen network, then evaluation; returns metrics.

        With `resume_step`, training continues from that checkpoint of the run directory.
        """
        try:
            return self._fit(resume_step)
        finally:
            self.out.close()

    def _fit(self, resume_step: int | None) -> dict[str, Any]:
        self.out.write("placements.json", self.pipeline.placements)
        if resume_step is None:
            position = _Position()
            self.monitor.record(epoch=0, step=0)
        else:
            position = self._restore(resume_step)
        while position.epoch <= self.cfg.train.epochs and not self._step_budget_spent():
            self._train_epoch(position)
            self._calibrate_batchnorm()
            self.monitor.record(position.epoch, self.steps)
            if self.on_epoch is not None:
                summary = dict(self.monitor.info_plane[-1], train_seconds=self.train_seconds)
                self.on_epoch({**summary, **self.readout.without_head()})
            position = _Position(position.epoch + 1, 0)
        if resume_step is None or self.steps > resume_step:
            self._checkpoint(position)
        train_features = self.readout.features(self.data.x_train)
        head_losses = self.readout.fit_head(train_features, self.out)
        metrics = self._evaluate(train_features)
        metrics["format_losses"] = head_losses
        final_probes = self.monitor.final_probes()
        if final_probes is not None:
            metrics["probes"] = final_probes
        self._save_model()
        self.out.final(metrics)
        self.out.write("metrics.json", metrics)  # last: it marks the run finished, model.pt included
        return metrics

    def _step_budget_spent(self) -> bool:
        return self.cfg.train.max_steps is not None and self.steps >= self.cfg.train.max_steps

    # --- the loop --------------------------------------------------------------------------------------

    def _train_epoch(self, position: _Position) -> None:
        pending: collections.deque[_InFlight] = collections.deque()
        clock = _Clock(time.perf_counter())
        for batch, factors in self._batches_with_factors(position):
            if self._step_budget_spent():
                break
            pending.append(_InFlight(batch, self.pipeline.submit(batch, factors)))
            self.steps += 1  # counted when submitted, so max_steps bounds what is started
            while len(pending) >= self.pipeline.max_in_flight:
                self._finish(pending.popleft(), len(pending), clock)
            if self._checkpoint_due():
                while pending:  # a checkpoint holds every stage at the same step
                    self._finish(pending.popleft(), len(pending), clock)
                self.train_seconds += clock.seconds
                self._checkpoint(_Position(position.epoch, batch.index + 1))
                clock = _Clock(time.perf_counter())
        while pending:
            self._finish(pending.popleft(), len(pending), clock)
        self.train_seconds += clock.seconds

    def _checkpoint_due(self) -> bool:
        train = self.cfg.train
        if self.run is None:
            return False  # nowhere to write one: no reason to hold the stages
        by_steps = train.checkpoint_every and self.steps % train.checkpoint_every == 0
        since_last = time.perf_counter() - self._checkpointed_at
        by_time = train.checkpoint_seconds and since_last >= train.checkpoint_seconds
        return bool(by_steps or by_time)

    def _batches_with_factors(self, position: _Position) -> Iterator[tuple[Batch, KernelFactors]]:
        train = self.cfg.train
        batches = iterate_batches(
            self.data.x_train, self.data.y_train, train.batch_size, train.seed, position.epoch, start=position.batch
        )
        return with_factors(batches, self.objective.kernel_factors, self.pipeline)

    def _finish(self, item: _InFlight, in_flight: int, clock: _Clock) -> None:
        done = item.batch.index + 1
        log_now = done % self.cfg.train.log_every == 0 or done == self._batches_per_epoch
        result = self.pipeline.result(item.handle, want_output=self.cfg.head.concurrent, read_back=log_now)
        if result.output is not None:
            self.head.step(result.output, item.batch.y)
        if result.stage_seconds:
            for total, (busy, idle) in zip(self._stage_seconds, result.stage_seconds):
                total[0] += busy
                total[1] += idle
        for event in self.pipeline.events():
            self.out.append({**event, "step": self.steps})
            if event["kind"] == "recovery":
                self.recoveries += 1
                self.out.write("placements.json", self.pipeline.placements)
        clock.finished += 1
        if log_now:
            rate = clock.finished * self.cfg.train.batch_size / max(clock.seconds, 1e-9)
            self._log_step(item.batch, result.layer_stats, in_flight + 1, rate)

    def _log_step(self, batch: Batch, stats: Tensor, in_flight: int, rate: float) -> None:
        stats = stats.cpu()
        total = self._batches_per_epoch
        done = batch.index + 1
        record = {
            "kind": "step",
            "epoch": batch.epoch,
            "step": (batch.epoch - 1) * total + done,  # the step these statistics are from (others may be in flight)
            "loss": float(stats[:, 0].sum()),
            "nhsic_zx": stats[:, 1].tolist(),
            "nhsic_zy": stats[:, 2].tolist(),
            "samples_per_second": rate,
            "in_flight": in_flight,
        }
        record.update(self._stage_time())
        self.out.append(record)
        eta = (total - done) * self.cfg.train.batch_size / max(rate, 1e-9)
        log.info(
            "epoch %d/%d  batch %d/%d  step %d  loss %.4g  nHSIC(Z,X) %.3g  nHSIC(Z,Y) %.3g (last layer)  "
            "%.0f samples/s  epoch eta %.0fs",
            batch.epoch,
            self.cfg.train.epochs,
            done,
            total,
            record["step"],
            record["loss"],
            stats[-1, 1],
            stats[-1, 2],
            rate,
            eta,
        )

    def _stage_time(self) -> dict[str, list[float]]:
        """Each stage's busy and idle seconds so far (a pipeline of one stage is never idle)."""
        if self.pipeline.num_stages == 1:
            return {}
        return {
            "stage_busy_seconds": [busy for busy, _ in self._stage_seconds],
            "stage_idle_seconds": [idle for _, idle in self._stage_seconds],
        }

    def _calibrate_batchnorm(self) -> None:
        """BatchNorm statistics of the weights as they are now, from a fixed seeded set of training batches,
        before anything reads the network in eval mode (see StageStep.calibrate_batchnorm)."""
        count, size = self.cfg.train.bn_calibration_batches, self.cfg.train.batch_size
        n = len(self.data.y_train)
        if count == 0:
            return
        order = np.random.default_rng(self.cfg.train.seed + 1).permutation(n)[: min(n, count * size)]
        self.pipeline.calibrate_batchnorm(
            [
                to_tensor(self.data.x_train[np.sort(chunk)])
                for chunk in np.array_split(order, max(1, len(order) // size))
            ]
        )

    # --- checkpoints -----------------------------------------------------------------------------------

    def _checkpoint(self, position: _Position) -> None:
        if self.run is None:
            return
        started = time.perf_counter()
        self.pipeline.save(self.run, self.steps)
        state = {
            "epoch": position.epoch,
            "batch": position.batch,
            "steps": self.steps,
            "train_seconds": self.train_seconds,
            "checkpoint_write_seconds": self.checkpoint_write_seconds,
            "recoveries": self.recoveries,
            **self.monitor.state_dict(),
            "stage_seconds": self._stage_seconds,
            "head": self.head.state_dict(),
            "torch_rng": torch.get_rng_state(),
        }
        checkpoint.save_state(self.run, checkpoint.coordinator_file(self.steps), state)
        checkpoint.commit(self.run, self.steps, self.pipeline.num_stages)
        self.out.append({"kind": "checkpoint", "step": self.steps, "epoch": position.epoch, "batch": position.batch})
        self._checkpointed_at = time.perf_counter()
        self.checkpoint_write_seconds += self._checkpointed_at - started
        log.info(
            "checkpoint at step %d written to %s", self.steps, self.run.path(checkpoint.checkpoint_dir(self.steps))
        )

    def _restore(self, step: int) -> _Position:
        assert self.run is not None
        manifest = checkpoint.read_manifest(self.run, step)
        if manifest["stages"] != self.pipeline.num_stages:
            raise checkpoint.CheckpointError(
                f"checkpoint at step {step} holds {manifest['stages']} stages, this run has "
                f"{self.pipeline.num_stages}; resume with the same number of stages"
            )
        state = checkpoint.load_state(self.run, checkpoint.coordinator_file(step))
        self.pipeline.load(self.run, step)
        self.head.load_state_dict(state["head"])
        self.monitor.load_state_dict(state)
        torch.set_rng_state(state["torch_rng"])
        self.steps, self.train_seconds = state["steps"], state["train_seconds"]
        self.checkpoint_write_seconds = state.get("checkpoint_write_seconds", 0.0)  # written since 2026-11-28
        self.recoveries, self._stage_seconds = state["recoveries"], state["stage_seconds"]
        self.out.append({"kind": "resume", "step": self.steps, "epoch": state["epoch"], "batch": state["batch"]})
        log.info("resumed from the checkpoint at step %d (epoch %d, batch %d)", step, state["epoch"], state["batch"])
        return _Position(state["epoch"], state["batch"])

    # --- the end of the run ----------------------------------------------------------------------------

    def _evaluate(self, train_features: Tensor) -> dict[str, Any]:
        metrics = self.readout.accuracies(train_features)
        last_epoch = self.monitor.info_plane[-1]
        metrics.update(
            train_seconds=self.train_seconds,
            checkpoint_write_seconds=self.checkpoint_write_seconds,
            steps=self.steps,
            samples_per_second=self.steps * self.cfg.train.batch_size / max(self.train_seconds, 1e-9),
            epochs=last_epoch["epoch"],
            per_layer=last_epoch["per_layer"],
            stages=self.pipeline.num_stages,
            recoveries=self.recoveries,
            **self._stage_time(),
        )
        log.info(
            "test accuracy: unformatted %s, formatted %.2f%%  (%d steps in %.1fs, %.0f samples/s)",
            _percent(metrics["test_accuracy_unformatted"]),
            metrics["test_accuracy_formatted"],
            self.steps,
            self.train_seconds,
            metrics["samples_per_second"],
        )
        return metrics

    def _save_model(self) -> None:
        """model.pt: the layers as the final checkpoint holds them (written at the end of HSIC training,
        wherever the stages live), then the head trained since."""
        if self.run is None:
            return
        network = checkpoint.network_state(self.run, checkpoint.latest_step(self.run))
        self.run.write_bytes(
            MODEL_FILE,
            model_bytes(
                self.cfg, "hsic", self.data.input_shape, self.data.num_classes, network, self.head.head.state_dict()
            ),
        )


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


def with_factors(
    batches: Iterable[Batch], factors: Callable[[Tensor, Tensor], KernelFactors], pipeline: Pipeline
) -> Iterator[tuple[Batch, KernelFactors | None]]:
    """Each batch on the pipeline's `factors_device` with its factors (`factors(x, labels)`), computed
    ahead in a thread where the pipeline asks for it; None where the pipeline computes them itself."""
    if pipeline.factors_device is None:
        return ((batch, None) for batch in batches)

    def prepare(batch: Batch) -> tuple[Batch, KernelFactors]:
        batch = batch.to(pipeline.factors_device)
        return batch, factors(batch.x, batch.y)

    if pipeline.prefetch_factors:
        return prefetched(batches, prepare, depth=pipeline.max_in_flight)
    return map(prepare, batches)


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}%"

"""The HSIC training loop, independent of where the layers run.

The loop reads batches, computes each batch's targets once, hands batch and targets to a `Pipeline`
(every layer in this process, or stage actors on Ray), trains the format head, measures the
information plane each epoch, evaluates, and writes metrics. A pipeline may keep several batches in
flight; the loop bounds how many.
"""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Protocol

import numpy as np
import torch
from torch import Tensor

from hsic_ray import checkpoint, evaluation, probes
from hsic_ray.config import ExperimentConfig
from hsic_ray.data import Batch, ImageData, iterate_batches, num_batches, to_tensor
from hsic_ray.head import FormatHeadTrainer
from hsic_ray.model_io import MODEL_FILE, model_bytes
from hsic_ray.objective import BatchTargets, HSICObjective
from hsic_ray.plots import plot_information_plane, plot_probes
from hsic_ray.prefetch import prefetched
from hsic_ray.run_dir import RunDirectory
from hsic_ray.tensorboard_log import TensorBoardLog

log = logging.getLogger("hsic_ray")

EVAL_CHUNK = 1024  # samples per forward pass when reading features of a whole split


@dataclass
class StepResult:
    """What one training step of the whole pipeline gives back to the loop."""

    layer_stats: Tensor  # [layers, 3]: (loss, nhsic_zx, nhsic_zy)
    output: Optional[Tensor] = None  # the last layer's output (CPU), when asked for
    stage_seconds: Optional[list[tuple[float, float]]] = None  # per stage (busy, idle) for this step
    stage_transfer_seconds: Optional[list[float]] = None  # per stage, the part of busy spent moving arrays


class Pipeline(Protocol):
    """Where the HSIC layers live and train."""

    max_in_flight: int
    num_stages: int
    prefetch_targets: bool  # compute the next batches' targets in a thread while the pipeline works
    placements: list[dict[str, Any]]  # per stage: layers, node, device (rewritten after recoveries)

    def submit(self, x: Tensor, targets: BatchTargets) -> Any:
        """Start one training step of every layer on this batch; returns a handle for `result`."""

    def result(self, handle: Any, want_output: bool, read_back: bool = True) -> StepResult:
        """Wait for a submitted step. With read_back False the loop will not read `layer_stats`, so a
        pipeline may leave the step running on its device (no host sync); True at log steps, where the
        pipeline also checks its stages' health."""

    def forward(self, x: Tensor) -> Tensor:
        """Eval-mode output of the whole network (CPU)."""

    def calibrate_batchnorm(self, batches: list[Tensor]) -> None:
        """Recompute every layer's BatchNorm running statistics from `batches`, through the whole network."""

    def layer_outputs(self, x: Tensor) -> list[Tensor]:
        """Every layer's eval-mode output as its linear probe reads it (`hsic_ray.probes.probe_view`), CPU."""

    def measure(self, x: Tensor, targets: BatchTargets) -> Tensor:
        """Eval-mode per-layer [layers, 2] (nhsic_zx, nhsic_zy) on one batch."""

    def save(self, run: RunDirectory, step: int) -> None:
        """Write every stage's state into step's checkpoint (see hsic_ray.checkpoint)."""

    def load(self, run: RunDirectory, step: int) -> None:
        """Restore every stage from step's checkpoint."""

    def events(self) -> list[dict[str, Any]]:
        """Records of what happened since the last call (recoveries), for metrics.jsonl."""


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
        on_epoch: Optional[Callable[[dict[str, Any]], None]] = None,
    ):
        """`on_epoch`, if given, receives after each HSIC epoch its information-plane record plus the test
        accuracies at that point, unformatted and of a least-squares linear readout (e.g. to report to Ray
        Tune)."""
        self.cfg = cfg
        self.on_epoch = on_epoch
        self.data = data
        self.pipeline = pipeline
        self.run = run
        self.objective = HSICObjective(cfg.hsic, data.num_classes)
        self.head = FormatHeadTrainer(output_features, data.num_classes, cfg.head, device)
        self.steps = 0
        self.train_seconds = 0.0
        self.recoveries = 0
        self.info_plane: list[dict[str, Any]] = []
        self.probes: list[dict[str, Any]] = []  # per epoch: every layer's linear probe on fixed subsets
        self._batches_per_epoch = num_batches(len(data.y_train), cfg.train.batch_size)
        self._eval_batch = self._fixed_eval_batch()
        self._probe_splits = self._fixed_probe_splits()
        self._stage_seconds = [[0.0, 0.0] for _ in range(pipeline.num_stages)]
        self._tensorboard = TensorBoardLog(run) if cfg.train.tensorboard and run is not None else None

    # --- the run ---------------------------------------------------------------------------------------

    def fit(self, resume_step: int | None = None) -> dict[str, Any]:
        """HSIC epochs, then the format head on the frozen network, then evaluation; returns metrics.

        With `resume_step`, training continues from that checkpoint of the run directory.
        """
        try:
            return self._fit(resume_step)
        finally:
            if self._tensorboard is not None:
                self._tensorboard.close()

    def _fit(self, resume_step: int | None) -> dict[str, Any]:
        self._write("placements.json", self.pipeline.placements)
        if resume_step is None:
            position = _Position()
            self._record_information_plane(epoch=0)
            self._record_probes(epoch=0)
        else:
            position = self._restore(resume_step)
        while position.epoch <= self.cfg.train.epochs and not self._step_budget_spent():
            self._train_epoch(position)
            self._calibrate_batchnorm()
            self._record_information_plane(position.epoch)
            self._record_probes(position.epoch)
            if self.on_epoch is not None:
                self.on_epoch(self._epoch_summary())
            position = _Position(position.epoch + 1, 0)
        if resume_step is None or self.steps > resume_step:
            self._checkpoint(position)
        train_features = self._features(self.data.x_train)
        head_losses = self._train_head(train_features)
        metrics = self._evaluate(train_features)
        metrics["format_losses"] = head_losses
        if self.cfg.train.probe_samples:
            metrics["probes"] = self._probe((self.data.x_train, self.data.y_train), (self.data.x_test, self.data.y_test))
            self._plot_probes(final=metrics["probes"])
        self._save_model()
        if self._tensorboard is not None:
            self._tensorboard.final(metrics)
        self._write("metrics.json", metrics)  # last: it marks the run finished, model.pt included
        return metrics

    def _step_budget_spent(self) -> bool:
        return self.cfg.train.max_steps is not None and self.steps >= self.cfg.train.max_steps

    def _train_epoch(self, position: _Position) -> None:
        train = self.cfg.train
        pending: collections.deque[_InFlight] = collections.deque()
        clock = _Clock(time.perf_counter())
        for batch, targets in self._batches_with_targets(position):
            if self._step_budget_spent():
                break
            pending.append(_InFlight(batch, self.pipeline.submit(batch.x, targets)))
            self.steps += 1  # counted when submitted, so max_steps bounds what is started
            while len(pending) >= self.pipeline.max_in_flight:
                self._finish(pending.popleft(), len(pending), clock)
            if train.checkpoint_every and self.steps % train.checkpoint_every == 0:
                while pending:  # a checkpoint holds every stage at the same step
                    self._finish(pending.popleft(), len(pending), clock)
                self.train_seconds += clock.seconds
                self._checkpoint(_Position(position.epoch, batch.index + 1))
                clock = _Clock(time.perf_counter())
        while pending:
            self._finish(pending.popleft(), len(pending), clock)
        self.train_seconds += clock.seconds

    def _batches_with_targets(self, position: _Position) -> Iterator[tuple[Batch, BatchTargets]]:
        train = self.cfg.train
        batches = iterate_batches(
            self.data.x_train, self.data.y_train, train.batch_size, train.seed, position.epoch, start=position.batch
        )

        def with_targets(batch: Batch) -> tuple[Batch, BatchTargets]:
            return batch, self.objective.targets(batch.x, batch.y)

        if self.pipeline.prefetch_targets:
            return prefetched(batches, with_targets, depth=self.pipeline.max_in_flight)
        return map(with_targets, batches)

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
            self.recoveries += event.get("kind") == "recovery"
            self._append({**event, "step": self.steps})
            self._write("placements.json", self.pipeline.placements)
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
        if self.pipeline.num_stages > 1:
            record["stage_busy_seconds"] = [busy for busy, _ in self._stage_seconds]
            record["stage_idle_seconds"] = [idle for _, idle in self._stage_seconds]
        self._append(record)
        eta = (total - done) * self.cfg.train.batch_size / max(rate, 1e-9)
        log.info(
            "epoch %d/%d  batch %d/%d  step %d  loss %.4g  nHSIC(Z,X) %.3g  nHSIC(Z,Y) %.3g (last layer)  "
            "%.0f samples/s  epoch eta %.0fs",
            batch.epoch, self.cfg.train.epochs, done, total, record["step"], record["loss"],
            stats[-1, 1], stats[-1, 2], rate, eta,
        )  # fmt: skip

    # --- checkpoints -----------------------------------------------------------------------------------

    def _checkpoint(self, position: _Position) -> None:
        if self.run is None:
            return
        self.pipeline.save(self.run, self.steps)
        state = {
            "epoch": position.epoch,
            "batch": position.batch,
            "steps": self.steps,
            "train_seconds": self.train_seconds,
            "recoveries": self.recoveries,
            "info_plane": self.info_plane,
            "probes": self.probes,
            "stage_seconds": self._stage_seconds,
            "head": self.head.state_dict(),
            "torch_rng": torch.get_rng_state(),
        }
        checkpoint.save_state(self.run, checkpoint.coordinator_file(self.steps), state)
        checkpoint.commit(self.run, self.steps, self.pipeline.num_stages)
        self._append({"kind": "checkpoint", "step": self.steps, "epoch": position.epoch, "batch": position.batch})
        log.info("checkpoint at step %d written to %s", self.steps, self.run.path(checkpoint.checkpoint_dir(self.steps)))

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
        torch.set_rng_state(state["torch_rng"])
        self.steps, self.train_seconds = state["steps"], state["train_seconds"]
        self.recoveries, self.info_plane = state["recoveries"], state["info_plane"]
        self._stage_seconds = state["stage_seconds"]
        self.probes = state.get("probes", [])  # absent from checkpoints written before probes
        self._append({"kind": "resume", "step": self.steps, "epoch": state["epoch"], "batch": state["batch"]})
        log.info("resumed from the checkpoint at step %d (epoch %d, batch %d)", step, state["epoch"], state["batch"])
        return _Position(state["epoch"], state["batch"])

    # --- head, information plane, evaluation ----------------------------------------------------------

    def _fixed_eval_batch(self) -> tuple[Tensor, BatchTargets]:
        n = len(self.data.y_train)
        size = min(self.cfg.train.eval_samples, n)
        idx = np.sort(np.random.default_rng(self.cfg.train.seed).choice(n, size, replace=False))
        x, y = to_tensor(self.data.x_train[idx]), torch.from_numpy(self.data.y_train[idx])
        return x, self.objective.targets(x, y)

    def _calibrate_batchnorm(self) -> None:
        """BatchNorm statistics of the weights as they are now, from a fixed seeded set of training batches,
        before anything reads the network in eval mode (see StageTrainer.calibrate_batchnorm)."""
        count, size = self.cfg.train.bn_calibration_batches, self.cfg.train.batch_size
        n = len(self.data.y_train)
        if count == 0:
            return
        order = np.random.default_rng(self.cfg.train.seed + 1).permutation(n)[: min(n, count * size)]
        self.pipeline.calibrate_batchnorm([to_tensor(self.data.x_train[np.sort(chunk)])
                                           for chunk in np.array_split(order, max(1, len(order) // size))])  # fmt: skip

    def _record_information_plane(self, epoch: int) -> None:
        x, targets = self._eval_batch
        stats = self.pipeline.measure(x, targets).cpu()
        per_layer = [{"nhsic_zx": float(zx), "nhsic_zy": float(zy)} for zx, zy in stats.tolist()]
        record = {"kind": "epoch", "epoch": epoch, "step": self.steps, "per_layer": per_layer}
        self.info_plane.append(record)
        self._append(record)
        if self.run is not None and len(self.info_plane) > 1:
            title = f"{self.cfg.preset or 'hsic'}: {self.cfg.hsic.estimator}, beta={self.cfg.hsic.beta:g}"
            self.run.write_with_local_file(
                "information_plane.png", lambda path: plot_information_plane(self.info_plane, path, title)
            )

    def _fixed_probe_splits(self) -> Optional[tuple[probes.Split, probes.Split]]:
        """The fixed (images, labels) of the training and test splits the per-epoch probes read:
        train.probe_samples of training samples and half as many test samples (at most each split)."""
        size = self.cfg.train.probe_samples
        if not size:
            return None
        rng = np.random.default_rng(self.cfg.train.seed)

        def subset(x: np.ndarray, y: np.ndarray, n: int) -> probes.Split:
            idx = np.sort(rng.choice(len(y), min(n, len(y)), replace=False))
            return x[idx], y[idx]

        data = self.data
        return subset(data.x_train, data.y_train, size), subset(data.x_test, data.y_test, max(1, size // 2))

    def _probe(self, train: probes.Split, test: probes.Split) -> dict[str, Any]:
        started = time.perf_counter()
        result = probes.probe_layers(self.pipeline.layer_outputs, train, test, self.data.num_classes, EVAL_CHUNK)
        result["seconds"] = time.perf_counter() - started
        return result

    def _record_probes(self, epoch: int) -> None:
        if self._probe_splits is None:
            return
        record = {"kind": "probes", "epoch": epoch, "step": self.steps, **self._probe(*self._probe_splits)}
        self.probes.append(record)
        self._append(record)
        self._plot_probes()
        test = record["test_accuracy"]
        log.info("linear probes after epoch %d, test accuracy of the first / best / last layer: %.2f / %.2f / %.2f%%  "
                 "(%.1fs)", epoch, test[0], max(test), test[-1], record["seconds"])  # fmt: skip

    def _plot_probes(self, final: Optional[dict[str, Any]] = None) -> None:
        if self.run is not None:
            title = f"{self.cfg.preset or 'hsic'}: linear probe of each layer"
            self.run.write_with_local_file("probes.png", lambda path: plot_probes(self.probes, path, title, final))

    def _epoch_summary(self) -> dict[str, Any]:
        summary = dict(self.info_plane[-1], train_seconds=self.train_seconds)
        train_features, test_features = self._features(self.data.x_train), self._features(self.data.x_test)
        summary["test_accuracy_unformatted"] = self._unformatted_accuracy(train_features, test_features)
        # The format head trains only after the last epoch: a closed-form linear readout stands in for it.
        summary["test_accuracy_least_squares"] = evaluation.least_squares_accuracy(
            train_features, self.data.y_train, test_features, self.data.y_test, self.data.num_classes
        )
        return summary

    def _unformatted_accuracy(self, train_features: Tensor, test_features: Tensor, method: str = "hungarian"):
        """None when the last layer is narrower than the class count (it cannot be read without a head)."""
        if train_features.shape[1] < self.data.num_classes:
            return None
        return evaluation.unformatted_accuracy(
            train_features, self.data.y_train, test_features, self.data.y_test, self.data.num_classes,
            method=method, balanced=method == "greedy",
        )  # fmt: skip

    def _features(self, x: np.ndarray) -> Tensor:
        chunks = [self.pipeline.forward(to_tensor(x[i : i + EVAL_CHUNK])) for i in range(0, len(x), EVAL_CHUNK)]
        return torch.cat(chunks).flatten(1)

    def _train_head(self, train_features: Tensor) -> list[float]:
        labels = torch.from_numpy(self.data.y_train)
        losses = self.head.fit(train_features, labels, self.cfg.head.epochs, self.cfg.train.seed)
        for epoch, loss in enumerate(losses, 1):
            self._append({"kind": "format_epoch", "epoch": epoch, "loss": loss})
            log.info("format head epoch %d/%d  loss %.4f", epoch, len(losses), loss)
        return losses

    def _evaluate(self, train_features: Tensor) -> dict[str, Any]:
        test_features = self._features(self.data.x_test)
        metrics: dict[str, Any] = {
            "test_accuracy_formatted": evaluation.accuracy(self.head.logits(test_features), self.data.y_test),
            "train_accuracy_formatted": evaluation.accuracy(self.head.logits(train_features), self.data.y_train),
        }
        metrics["test_accuracy_unformatted"] = self._unformatted_accuracy(train_features, test_features)
        # The authors' reading, for comparison: greedy assignment, mean of per-class accuracies.
        metrics["test_accuracy_unformatted_greedy"] = self._unformatted_accuracy(train_features, test_features, "greedy")
        metrics.update(
            train_seconds=self.train_seconds,
            steps=self.steps,
            samples_per_second=self.steps * self.cfg.train.batch_size / max(self.train_seconds, 1e-9),
            epochs=self.info_plane[-1]["epoch"],
            per_layer=self.info_plane[-1]["per_layer"],
            stages=self.pipeline.num_stages,
            recoveries=self.recoveries,
        )
        if self.pipeline.num_stages > 1:
            metrics["stage_busy_seconds"] = [busy for busy, _ in self._stage_seconds]
            metrics["stage_idle_seconds"] = [idle for _, idle in self._stage_seconds]
        log.info(
            "test accuracy: unformatted %s, formatted %.2f%%  (%d steps in %.1fs, %.0f samples/s)",
            _percent(metrics["test_accuracy_unformatted"]), metrics["test_accuracy_formatted"],
            self.steps, self.train_seconds, metrics["samples_per_second"],
        )  # fmt: skip
        return metrics

    def _save_model(self) -> None:
        """model.pt: the layers as the final checkpoint holds them (written at the end of HSIC training,
        wherever the stages live), then the head trained since."""
        if self.run is None:
            return
        network = checkpoint.network_state(self.run, checkpoint.latest_step(self.run))
        self.run.write_bytes(MODEL_FILE, model_bytes(self.cfg, "hsic", self.data.input_shape, self.data.num_classes,
                                                     network, self.head.head.state_dict()))  # fmt: skip

    # --- output ---------------------------------------------------------------------------------------

    def _append(self, record: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.append_jsonl("metrics.jsonl", record)
        if self._tensorboard is not None:
            self._tensorboard.record(record)

    def _write(self, name: str, obj: Any) -> None:
        if self.run is not None:
            self.run.write_json(name, obj)


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}%"

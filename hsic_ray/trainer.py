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
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from hsic_ray import evaluation
from hsic_ray.config import ExperimentConfig
from hsic_ray.data import Batch, ImageData, iterate_batches, num_batches, to_tensor
from hsic_ray.head import FormatHeadTrainer
from hsic_ray.objective import BatchTargets, HSICObjective
from hsic_ray.plots import plot_information_plane
from hsic_ray.run_dir import RunDirectory

log = logging.getLogger("hsic_ray")

EVAL_CHUNK = 1024  # samples per forward pass when reading features of a whole split


class Pipeline(Protocol):
    """Where the HSIC layers live and train."""

    max_in_flight: int

    def submit(self, x: Tensor, targets: BatchTargets) -> Any:
        """Start one training step of every layer on this batch; returns a handle for `result`."""

    def result(self, handle: Any) -> tuple[Tensor, Tensor]:
        """The step's final output (detached, CPU) and per-layer [layers, 3] (loss, nhsic_zx, nhsic_zy)."""

    def forward(self, x: Tensor) -> Tensor:
        """Eval-mode output of the whole network (CPU)."""

    def measure(self, x: Tensor, targets: BatchTargets) -> Tensor:
        """Eval-mode per-layer [layers, 2] (nhsic_zx, nhsic_zy) on one batch."""


@dataclass
class _InFlight:
    batch: Batch
    handle: Any


class HSICTrainer:
    def __init__(
        self,
        cfg: ExperimentConfig,
        data: ImageData,
        pipeline: Pipeline,
        output_features: int,
        run: RunDirectory | None = None,
        device: torch.device | str = "cpu",
    ):
        self.cfg = cfg
        self.data = data
        self.pipeline = pipeline
        self.run = run
        self.objective = HSICObjective(cfg.hsic, data.num_classes)
        self.head = FormatHeadTrainer(output_features, data.num_classes, cfg.head, device)
        self.steps = 0
        self.train_seconds = 0.0
        self.info_plane: list[dict[str, Any]] = []
        self._eval_batch = self._fixed_eval_batch()

    # --- the run ---------------------------------------------------------------------------------------

    def fit(self) -> dict[str, Any]:
        """HSIC epochs, then the format head on the frozen network, then evaluation; returns metrics."""
        self._record_information_plane(epoch=0)
        for epoch in range(1, self.cfg.train.epochs + 1):
            self._train_epoch(epoch)
            self._record_information_plane(epoch)
            if self._step_budget_spent():
                break
        train_features = self._features(self.data.x_train)
        head_losses = self._train_head(train_features)
        metrics = self._evaluate(train_features)
        metrics["format_losses"] = head_losses
        self._write("metrics.json", metrics)
        return metrics

    def _step_budget_spent(self) -> bool:
        return self.cfg.train.max_steps is not None and self.steps >= self.cfg.train.max_steps

    def _train_epoch(self, epoch: int) -> None:
        train = self.cfg.train
        total = num_batches(len(self.data.y_train), train.batch_size)
        pending: collections.deque[_InFlight] = collections.deque()
        started = time.perf_counter()
        batches = iterate_batches(self.data.x_train, self.data.y_train, train.batch_size, train.seed, epoch)
        for batch in batches:
            if self._step_budget_spent():
                break
            targets = self.objective.targets(batch.x, batch.y)
            pending.append(_InFlight(batch, self.pipeline.submit(batch.x, targets)))
            self.steps += 1  # counted when submitted, so max_steps bounds what is started
            while len(pending) >= self.pipeline.max_in_flight:
                self._finish(pending.popleft(), total, started)
        while pending:
            self._finish(pending.popleft(), total, started)
        self.train_seconds += time.perf_counter() - started

    def _finish(self, item: _InFlight, total: int, started: float) -> None:
        out, stats = self.pipeline.result(item.handle)
        if self.cfg.head.concurrent:
            self.head.step(out, item.batch.y)
        index = item.batch.index + 1
        if index % self.cfg.train.log_every == 0 or index == total:
            self._log_step(item.batch, stats, total, time.perf_counter() - started)

    def _log_step(self, batch: Batch, stats: Tensor, total: int, epoch_seconds: float) -> None:
        stats = stats.cpu()
        done = batch.index + 1
        rate = done * self.cfg.train.batch_size / max(epoch_seconds, 1e-9)
        record = {
            "kind": "step",
            "epoch": batch.epoch,
            "step": self.steps,
            "loss": float(stats[:, 0].sum()),
            "nhsic_zx": stats[:, 1].tolist(),
            "nhsic_zy": stats[:, 2].tolist(),
            "samples_per_second": rate,
        }
        self._append(record)
        eta = (total - done) * self.cfg.train.batch_size / rate
        log.info(
            "epoch %d/%d  batch %d/%d  step %d  loss %.4g  nHSIC(Z,X) %.3g  nHSIC(Z,Y) %.3g (last layer)  "
            "%.0f samples/s  epoch eta %.0fs",
            batch.epoch, self.cfg.train.epochs, done, total, self.steps, record["loss"],
            stats[-1, 1], stats[-1, 2], rate, eta,
        )  # fmt: skip

    # --- head, information plane, evaluation ----------------------------------------------------------

    def _fixed_eval_batch(self) -> tuple[Tensor, BatchTargets]:
        n = len(self.data.y_train)
        size = min(self.cfg.train.eval_samples, n)
        idx = np.sort(np.random.default_rng(self.cfg.train.seed).choice(n, size, replace=False))
        x, y = to_tensor(self.data.x_train[idx]), torch.from_numpy(self.data.y_train[idx])
        return x, self.objective.targets(x, y)

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
        classes = self.data.num_classes
        metrics: dict[str, Any] = {
            "test_accuracy_formatted": evaluation.accuracy(self.head.logits(test_features), self.data.y_test),
            "train_accuracy_formatted": evaluation.accuracy(self.head.logits(train_features), self.data.y_train),
        }
        if train_features.shape[1] >= classes:
            fit = (train_features, self.data.y_train, test_features, self.data.y_test, classes)
            metrics["test_accuracy_unformatted"] = evaluation.unformatted_accuracy(*fit, method="hungarian")
            # The authors' reading, for comparison: greedy assignment, mean of per-class accuracies.
            metrics["test_accuracy_unformatted_greedy"] = evaluation.unformatted_accuracy(
                *fit, method="greedy", balanced=True
            )
        else:  # a last layer narrower than the class count cannot be read without a head
            metrics["test_accuracy_unformatted"] = metrics["test_accuracy_unformatted_greedy"] = None
        metrics.update(
            train_seconds=self.train_seconds,
            steps=self.steps,
            samples_per_second=self.steps * self.cfg.train.batch_size / max(self.train_seconds, 1e-9),
            epochs=self.info_plane[-1]["epoch"],
            per_layer=self.info_plane[-1]["per_layer"],
        )
        log.info(
            "test accuracy: unformatted %s, formatted %.2f%%  (%d steps in %.1fs, %.0f samples/s)",
            _percent(metrics["test_accuracy_unformatted"]), metrics["test_accuracy_formatted"],
            self.steps, self.train_seconds, metrics["samples_per_second"],
        )  # fmt: skip
        return metrics

    # --- output ---------------------------------------------------------------------------------------

    def _append(self, record: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.append_jsonl("metrics.jsonl", record)

    def _write(self, name: str, obj: Any) -> None:
        if self.run is not None:
            self.run.write_json(name, obj)


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}%"

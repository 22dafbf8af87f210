"""The end of an HSIC run, once its layers stop training: the format head, the accuracies, the final probes,
model.pt, and metrics.json, written last because it marks the run finished (docs/design.md, "The end of a
run: format head and readouts")."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor

from hsic_ray.config import ExperimentConfig
from hsic_ray.data import ImageData
from hsic_ray.final_pass import FinalPass
from hsic_ray.head import FormatHead
from hsic_ray.layer_monitor import LayerMonitor
from hsic_ray.network_evaluation import NetworkEvaluation
from hsic_ray.run import checkpoint
from hsic_ray.run.directory import RunDirectory
from hsic_ray.run.metrics_log import MetricsLog
from hsic_ray.run.model_io import MODEL_FILE, model_bytes

log = logging.getLogger("hsic_ray")


class RunEnd:
    def __init__(
        self,
        cfg: ExperimentConfig,
        data: ImageData,
        final_pass: FinalPass,
        evaluation: NetworkEvaluation,
        head: FormatHead,
        monitor: LayerMonitor,
        out: MetricsLog,
        run: RunDirectory | None,
    ):
        """`cfg`: the whole config, which model.pt keeps to rebuild the network."""
        self.cfg, self.data, self.final_pass, self.evaluation = cfg, data, final_pass, evaluation
        self.head, self.monitor, self.out, self.run = head, monitor, out, run

    def finish(self, progress: dict[str, Any]) -> dict[str, Any]:
        """Train the head on the frozen network, evaluate, write model.pt and metrics.json; returns the
        metrics. `progress`: the training loop's counters as metrics.json reports them."""
        timeline = self.out.timeline
        network = self.final_pass.read()
        with timeline.phase("head"):
            head_losses = self._fit_head(network.train_features)
        with timeline.phase("final_evaluation"):
            metrics = self.evaluation.final_accuracies(network.train_features, network.test_features, self.head)
        last_epoch = self.monitor.info_plane[-1]
        metrics.update(progress, epochs=last_epoch["epoch"], per_layer=last_epoch["per_layer"])
        _log_accuracies(metrics)
        metrics["format_losses"] = head_losses
        if network.probes is not None:
            metrics["probes"] = network.probes
        self.monitor.plot(network.probes)
        with timeline.phase("writing"):
            self._save_model()
            self.out.final(metrics)
        metrics["phase_seconds"] = timeline.summary()
        self.out.write("metrics.json", metrics)  # last: it marks the run finished, model.pt included
        return metrics

    def _fit_head(self, train_features: Tensor) -> list[float]:
        """Train the format head on the frozen network's training-set output; its loss per epoch."""
        labels = torch.from_numpy(self.data.y_train)
        losses = self.head.fit(train_features, labels, self.cfg.train.seed)
        for epoch, loss in enumerate(losses, 1):
            self.out.append({"kind": "format_epoch", "epoch": epoch, "loss": loss})
            log.info("format head epoch %d/%d  loss %.4f", epoch, len(losses), loss)
        return losses

    def _save_model(self) -> None:
        """model.pt: the layers as the final checkpoint holds them (written at the end of HSIC training,
        wherever the stages live), then the head trained since."""
        if self.run is None:
            return
        network = checkpoint.network_state(self.run, checkpoint.latest_step(self.run))
        data = self.data
        head = self.head.head.state_dict()
        self.run.write_bytes(
            MODEL_FILE, model_bytes(self.cfg, "hsic", data.input_shape, data.num_classes, network, head)
        )


def _log_accuracies(metrics: dict[str, Any]) -> None:
    unformatted = metrics["test_accuracy_unformatted"]
    log.info(
        "test accuracy: unformatted %s, formatted %.2f%%  (%d steps in %.1fs, %.0f samples/s)",
        "n/a" if unformatted is None else f"{unformatted:.2f}%",
        metrics["test_accuracy_formatted"],
        metrics["steps"],
        metrics["train_seconds"],
        metrics["samples_per_second"],
    )

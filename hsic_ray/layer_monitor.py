"""Every layer, epoch by epoch, while HSIC trains: the information plane and the linear probes.

The information plane is each layer's (nHSIC(Z, X), nHSIC(Z, Y)) on one fixed training batch; the probes
are a linear classifier per layer fitted on fixed training samples and scored on fixed test samples
(hsic_ray.probes). Both read the network through the pipeline in eval mode, wherever its layers run.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any

import numpy as np
import torch
from torch import Tensor

from hsic_ray import probes
from hsic_ray.config import TrainConfig
from hsic_ray.data import ImageData, fixed_subset, to_tensor
from hsic_ray.objective import HSICObjective, KernelFactors
from hsic_ray.pipeline import Pipeline
from hsic_ray.run.metrics_log import MetricsLog

log = logging.getLogger("hsic_ray")


class LayerMonitor:
    def __init__(
        self,
        train: TrainConfig,
        data: ImageData,
        objective: HSICObjective,
        pipeline: Pipeline,
        out: MetricsLog,
        name: str = "hsic",
    ):
        """`name` heads the plots' titles (the preset's)."""
        self.train = train
        self.data = data
        self.pipeline = pipeline
        self.out = out
        self.info_plane: list[dict[str, Any]] = []  # per epoch: every layer's nHSIC terms on the fixed batch
        self.probes: list[dict[str, Any]] = []  # per epoch: every layer's linear probe on the fixed subsets
        self._eval_batch = self._fixed_eval_batch(objective)
        self._probe_splits = self._fixed_probe_splits()
        hsic = objective.cfg
        self._plane_title = f"{name}: {hsic.estimator}, beta={hsic.beta:g}"
        self._probes_title = f"{name}: linear probe of each layer"
        self._plotted_at = time.monotonic()  # a run shorter than train.plot_seconds draws once, at its end

    def record(self, epoch: int, step: int, probes: bool = True) -> None:
        """The information plane and (with `probes`) the linear probes of the network as it is now (epoch 0:
        before training); the plots are redrawn when train.plot_seconds have passed since they last were."""
        self._record_information_plane(epoch, step)
        if probes:
            self._record_probes(epoch, step)
        plot_seconds = self.train.plot_seconds
        if plot_seconds and time.monotonic() - self._plotted_at >= plot_seconds:
            self.plot()

    def plot(self, final_probes: dict[str, Any] | None = None) -> None:
        """information_plane.png and probes.png (with `final_probes`, as the run ends) from the records so far."""
        # Imported here: matplotlib is a noticeable part of a job's start-up, and most runs draw once, at the end.
        from hsic_ray.run.plots import plot_information_plane, plot_probes

        if self.info_plane:  # one epoch's record (a run of one epoch, monitored by time share) is one point per layer
            info_plane = self.info_plane
            self.out.plot(
                "information_plane.png", lambda path: plot_information_plane(info_plane, path, self._plane_title)
            )
        if self.probes:
            self.out.plot("probes.png", lambda path: plot_probes(self.probes, path, self._probes_title, final_probes))
        self._plotted_at = time.monotonic()

    def state_dict(self) -> dict[str, Any]:
        return {"info_plane": self.info_plane, "probes": self.probes}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.info_plane = state["info_plane"]
        self.probes = state["probes"]

    # --- the information plane -------------------------------------------------------------------------

    def _fixed_eval_batch(self, objective: HSICObjective) -> tuple[Tensor, KernelFactors]:
        n = len(self.data.y_train)
        size = min(self.train.eval_samples, n)
        idx = np.sort(np.random.default_rng(self.train.seed).choice(n, size, replace=False))
        x, y = to_tensor(self.data.x_train[idx]), torch.from_numpy(self.data.y_train[idx])
        return x, objective.kernel_factors(x, y)

    def _record_information_plane(self, epoch: int, step: int) -> None:
        x, factors = self._eval_batch
        with self.out.timeline.phase("information_plane"):
            stats = self.pipeline.measure(x, factors).cpu()
        per_layer = [{"nhsic_zx": float(zx), "nhsic_zy": float(zy)} for zx, zy in stats.tolist()]
        record = {"kind": "epoch", "epoch": epoch, "step": step, "per_layer": per_layer}
        self.info_plane.append(record)
        self.out.append(record)

    # --- linear probes ---------------------------------------------------------------------------------

    def _fixed_probe_splits(self) -> tuple[probes.Split, probes.Split] | None:
        """The fixed (images, labels) of the training and test splits the per-epoch probes read:
        train.probe_samples of training samples and half as many test samples (at most each split)."""
        size = self.train.probe_samples
        if not size:
            return None
        rng, data = np.random.default_rng(self.train.seed), self.data
        train = fixed_subset(data.x_train, data.y_train, size, rng)
        return train, fixed_subset(data.x_test, data.y_test, max(1, size // 2), rng)

    def _probe(self, train: probes.Split, test: probes.Split) -> dict[str, Any]:
        started = time.perf_counter()
        layer_outputs = functools.partial(self.pipeline.layer_outputs, max_features=self.train.probe_features)
        result = probes.probe_layers(layer_outputs, train, test, self.data.num_classes)
        result["seconds"] = time.perf_counter() - started
        return result

    def _record_probes(self, epoch: int, step: int) -> None:
        if self._probe_splits is None:
            return
        with self.out.timeline.phase("probes"):
            record = {"kind": "probes", "epoch": epoch, "step": step, **self._probe(*self._probe_splits)}
        self.probes.append(record)
        self.out.append(record)
        test = record["test_accuracy"]
        log.info(
            "linear probes after epoch %d, test accuracy of the first / best / last layer: %.2f / %.2f / %.2f%%  "
            "(%.1fs)",
            epoch,
            test[0],
            max(test),
            test[-1],
            record["seconds"],
        )

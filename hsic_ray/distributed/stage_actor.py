"""A Ray actor that owns one stage: a contiguous run of layers, their optimizers and its device.

Activations travel between stages as CPU numpy arrays: Ray reads them zero-copy from shared memory on the
same node, and a stage moves them to its device on arrival (a CUDA tensor in the object store would be
rebuilt on the sender's device, which the receiver may not have).
"""

from __future__ import annotations

import os
import time
from typing import Any, Optional

import numpy as np
import ray
import torch

from hsic_ray import checkpoint
from hsic_ray.config import ExperimentConfig
from hsic_ray.distributed.placement import StageSpec
from hsic_ray.models import Shape, build_network
from hsic_ray.objective import BatchTargets, HSICObjective
from hsic_ray.run_dir import RunDirectory
from hsic_ray.stage import StageTrainer


def targets_to_numpy(targets: BatchTargets) -> tuple[Optional[np.ndarray], np.ndarray]:
    x = None if targets.x_factor is None else targets.x_factor.cpu().numpy()
    return x, targets.y_factor.cpu().numpy()


def targets_from_numpy(arrays: tuple[Optional[np.ndarray], np.ndarray]) -> BatchTargets:
    x, y = arrays
    return BatchTargets(None if x is None else torch.from_numpy(np.array(x)), torch.from_numpy(np.array(y)))


def _tensor(x: np.ndarray) -> torch.Tensor:
    # Object-store arrays are read-only views of shared memory; torch needs memory it may own.
    return torch.from_numpy(np.array(x, copy=True))


@ray.remote
class StageActor:
    def __init__(
        self,
        spec: StageSpec,
        cfg: ExperimentConfig,
        input_shape: Shape,
        num_classes: int,
        restore: Optional[tuple[str, int]] = None,
    ):
        torch.set_num_threads(max(1, int(spec.num_cpus)))
        self.spec = spec
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        # Every stage builds the whole network from the run's seed and keeps its slice, so the initial
        # weights equal the in-process trainer's without shipping them through the driver.
        torch.manual_seed(cfg.train.seed)
        net = build_network(cfg.model, input_shape)
        layers = list(net.layers)[spec.start : spec.stop]
        objective = HSICObjective(cfg.hsic, num_classes)
        self.trainer = StageTrainer(layers, objective, cfg.optim, self.device, cfg.train.cuda_graphs)
        self._last_end: Optional[float] = None
        if restore is not None:
            self.load(*restore)

    def step(self, x: np.ndarray, targets: tuple) -> tuple[np.ndarray, dict[str, Any]]:
        """One local HSIC step of this stage's layers; returns (output, report) as two objects."""
        started = time.perf_counter()
        idle = 0.0 if self._last_end is None else started - self._last_end
        out, stats = self.trainer.train_step(_tensor(x), targets_from_numpy(targets))
        out_np = out.cpu().numpy()
        stats_np = stats.cpu().numpy()
        self.trainer.check_solves()  # the copies above synchronised already: checking costs nothing more
        self._last_end = time.perf_counter()
        return out_np, {"stats": stats_np, "busy": self._last_end - started, "idle": idle}

    def forward(self, x: np.ndarray) -> np.ndarray:
        self._last_end = None  # evaluation breaks the stream: the next step's wait is not pipeline idle
        return self.trainer.forward(_tensor(x)).cpu().numpy()

    def measure(self, x: np.ndarray, targets: tuple) -> tuple[np.ndarray, np.ndarray]:
        self._last_end = None
        out, stats = self.trainer.measure(_tensor(x), targets_from_numpy(targets))
        return out.cpu().numpy(), stats.cpu().numpy()

    def save(self, run_location: str, step: int) -> None:
        run = RunDirectory(run_location)
        checkpoint.save_state(run, checkpoint.stage_file(step, self.spec.index), self.trainer.state_dict())

    def load(self, run_location: str, step: int) -> None:
        run = RunDirectory(run_location)
        self.trainer.load_state_dict(checkpoint.load_state(run, checkpoint.stage_file(step, self.spec.index)))

    def where(self) -> dict[str, Any]:
        context = ray.get_runtime_context()
        return {
            "node_id": context.get_node_id(),
            "node_ip": ray.util.get_node_ip_address(),
            "pid": os.getpid(),
            "device": str(self.device),
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
            "layers": [self.spec.start, self.spec.stop],
        }

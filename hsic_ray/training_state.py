"""Where HSIC training stands, what it has counted, and the coordinator's checkpoints of both.

A checkpoint holds every stage at the same step (the loop waits for every batch in flight first): each stage
writes its own state (`Pipeline.save`); the coordinator writes its position in the data, its counters, the
format head, the layer monitor's records and torch's RNG state; then a manifest marks the checkpoint complete
(hsic_ray.run.checkpoint; docs/design.md, "Checkpoints by time").
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from hsic_ray.config import TrainConfig
from hsic_ray.head import FormatHead
from hsic_ray.layer_monitor import LayerMonitor
from hsic_ray.pipeline import Pipeline
from hsic_ray.run import checkpoint
from hsic_ray.run.directory import RunDirectory
from hsic_ray.run.metrics_log import MetricsLog

log = logging.getLogger("hsic_ray")


@dataclass
class Position:
    """Where training stands: the next batch to submit."""

    epoch: int = 1
    batch: int = 0


@dataclass
class Progress:
    """What training has counted; checkpointed, so that a resumed run counts on."""

    steps: int = 0
    train_seconds: float = 0.0
    checkpoint_write_seconds: float = 0.0  # writing checkpoints (train_seconds leaves it out)
    recoveries: int = 0
    stage_seconds: list[list[float]] = field(default_factory=list)  # per stage: [busy, idle]

    @classmethod
    def of_stages(cls, num_stages: int) -> Progress:
        return cls(stage_seconds=[[0.0, 0.0] for _ in range(num_stages)])

    def add_stage_seconds(self, seconds: list[tuple[float, float]]) -> None:
        for total, (busy, idle) in zip(self.stage_seconds, seconds):
            total[0] += busy
            total[1] += idle

    def stage_time(self) -> dict[str, list[float]]:
        """Each stage's busy and idle seconds so far (a pipeline of one stage is never idle)."""
        if len(self.stage_seconds) == 1:
            return {}
        return {
            "stage_busy_seconds": [busy for busy, _ in self.stage_seconds],
            "stage_idle_seconds": [idle for _, idle in self.stage_seconds],
        }

    def summary(self, batch_size: int) -> dict[str, Any]:
        """The counters as metrics.json reports them."""
        return {
            "train_seconds": self.train_seconds,
            "checkpoint_write_seconds": self.checkpoint_write_seconds,
            "steps": self.steps,
            "samples_per_second": self.steps * batch_size / max(self.train_seconds, 1e-9),
            "stages": len(self.stage_seconds),
            "recoveries": self.recoveries,
            **self.stage_time(),
        }

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for counter in dataclasses.fields(self):
            setattr(self, counter.name, state[counter.name])


class TrainingCheckpoints:
    """When the loop checkpoints, what the coordinator writes, and resuming from it."""

    def __init__(
        self,
        train: TrainConfig,
        run: RunDirectory | None,
        pipeline: Pipeline,
        out: MetricsLog,
        progress: Progress,
        head: FormatHead,
        monitor: LayerMonitor,
    ):
        self.train, self.run, self.pipeline, self.out = train, run, pipeline, out
        self.progress, self.head, self.monitor = progress, head, monitor
        self._written_at = time.perf_counter()  # or when this process started training

    def due(self) -> bool:
        if self.run is None:
            return False  # nowhere to write one: no reason to hold the stages
        train = self.train
        by_steps = train.checkpoint_every and self.progress.steps % train.checkpoint_every == 0
        by_time = train.checkpoint_seconds and time.perf_counter() - self._written_at >= train.checkpoint_seconds
        return bool(by_steps or by_time)

    def save(self, position: Position) -> None:
        """A checkpoint of every stage and the coordinator at `position`; every batch before it finished."""
        if self.run is None:
            return
        with self.out.timeline.phase("checkpoints"):
            self._save(position)

    def _save(self, position: Position) -> None:
        started, steps = time.perf_counter(), self.progress.steps
        self.pipeline.save(self.run, steps)
        state = {
            "epoch": position.epoch,
            "batch": position.batch,
            **self.progress.state_dict(),
            **self.monitor.state_dict(),
            "head": self.head.state_dict(),
            "torch_rng": torch.get_rng_state(),
        }
        checkpoint.save_state(self.run, checkpoint.coordinator_file(steps), state)
        checkpoint.commit(self.run, steps, self.pipeline.num_stages)
        self.out.append({"kind": "checkpoint", "step": steps, "epoch": position.epoch, "batch": position.batch})
        self._written_at = time.perf_counter()
        self.progress.checkpoint_write_seconds += self._written_at - started
        log.info("checkpoint at step %d written to %s", steps, self.run.path(checkpoint.checkpoint_dir(steps)))

    def restore(self, step: int) -> Position:
        """Every stage and the coordinator as step's checkpoint holds them; returns where training resumes."""
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
        self.progress.load_state_dict(state)
        torch.set_rng_state(state["torch_rng"])
        epoch, batch = state["epoch"], state["batch"]
        self.out.append({"kind": "resume", "step": self.progress.steps, "epoch": epoch, "batch": batch})
        log.info("resumed from the checkpoint at step %d (epoch %d, batch %d)", step, epoch, batch)
        return Position(epoch, batch)

"""Where a run's records go: the run directory's metrics.jsonl, JSON files and plots, and TensorBoard.

Without a run directory (a trainer built in a test or a notebook) records go nowhere. The log also holds the
run's `Timeline`, so that whoever records something can time it; its own writing is the `writing` phase.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hsic_ray.run.directory import RunDirectory
from hsic_ray.run.tensorboard_log import TensorBoardLog
from hsic_ray.timeline import Timeline


class MetricsLog:
    def __init__(self, run: RunDirectory | None, tensorboard: bool = False, timeline: Timeline | None = None):
        self.run = run
        self.timeline = timeline or Timeline()
        self._tensorboard = TensorBoardLog(run) if tensorboard and run is not None else None

    def append(self, record: dict[str, Any]) -> None:
        """One record of metrics.jsonl (and its scalars in TensorBoard)."""
        with self.timeline.phase("writing"):
            if self.run is not None:
                self.run.append_jsonl("metrics.jsonl", record)
            if self._tensorboard is not None:
                self._tensorboard.record(record)

    def write(self, name: str, obj: Any) -> None:
        if self.run is not None:
            with self.timeline.phase("writing"):
                self.run.write_json(name, obj)

    def plot(self, name: str, draw: Callable[[str], None]) -> None:
        """`draw(path)` writes an image file; it is stored as `name` in the run directory."""
        if self.run is not None:
            with self.timeline.phase("plots"):
                self.run.write_with_local_file(name, draw)

    def final(self, metrics: dict[str, Any]) -> None:
        if self._tensorboard is not None:
            self._tensorboard.final(metrics)

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()

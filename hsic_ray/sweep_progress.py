"""A sweep's progress as its driver logs it: one compact table of the trials' own settings and accuracies,
in place of Ray Tune's status tables (which list every parameter, Tune's bookkeeping columns, and a "current
best trial" that compares a running trial's per-epoch readout with finished trials' format heads).

`SweepProgress` is a Tune callback: it logs the table at most every `every_s` seconds, and only when a trial
started, reported or ended since the last one, and once more at the end if anything changed since. The table
is built by `progress_table` from plain values, so it can be read without Ray.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from typing import Any

from ray import tune

from hsic_ray.sweep_spec import axis_name

log = logging.getLogger("hsic_ray")

STATUS_WORDS = {"PENDING": "pending", "RUNNING": "running", "PAUSED": "paused", "ERROR": "failed"}


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}" if math.isfinite(value) else str(value)
    return str(value)


def trial_status(status: str, result: dict[str, Any]) -> str:
    """A trial's state in words: a TERMINATED trial that never sent its final report was stopped early (ASHA)."""
    if status == "TERMINATED":
        return "done" if result.get("final") else "stopped"
    return STATUS_WORDS.get(status, status.lower())


def progress_table(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Aligned text lines: a header, then one line per row (all rows hold the same keys)."""
    if not rows:
        return []
    columns = list(rows[0])
    cells = [columns, *([_cell(row[c]) for c in columns] for row in rows)]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in cells]


def best_finished(rows: Sequence[dict[str, Any]], axes: Sequence[str]) -> str:
    """The finished trial with the highest final accuracy, in words, or '-' while none has finished.

    Only final accuracies are compared: they are what results.md reports and what the Tuner's best result
    holds (the last report of each trial). A running trial's per-epoch readout is another measurement (for
    HSIC trials a closed-form readout, not the format head trained at the end), so it never ranks here."""
    done = [row for row in rows if row["final"] is not None]
    if not done:
        return "-"
    best = max(done, key=lambda row: row["final"])
    settings = "".join(f" {axis_name(key)}={best[axis_name(key)]}" for key in axes)
    return f"{best['method']} depth {best['depth']}{settings}: {best['final']:.2f}%"


class SweepProgress(tune.Callback):
    """Logs the sweep's trials as one compact table, at most every `every_s` seconds while something changes.

    Columns: method, depth, each grid axis, status, epoch, `readout` (the latest per-epoch accuracy, what ASHA
    compares) and `final` (the accuracy of the trial's final report, the format head's)."""

    def __init__(self, metric: str, axes: Sequence[str], every_s: float = 30.0):
        self.metric = metric
        self.axes = list(axes)
        self.every_s = every_s
        self._readouts: dict[str, float | None] = {}  # trial id -> its latest per-epoch readout
        self._changed = True
        self._logged_at = -math.inf

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        self._changed = True

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict[str, Any], **info) -> None:
        if not result.get("final"):
            self._readouts[trial.trial_id] = result.get(self.metric)
        self._changed = True

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        self._changed = True

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self._changed = True

    def on_step_end(self, iteration: int, trials: list, **info) -> None:
        now = time.monotonic()
        if self._changed and now - self._logged_at >= self.every_s:
            self._changed, self._logged_at = False, now
            log.info("%s", self.summary(trials))

    def on_experiment_end(self, trials: list, **info) -> None:
        if self._changed:  # the final state, whenever the last table was
            self._changed = False
            log.info("%s", self.summary(trials))

    def row(self, trial) -> dict[str, Any]:
        config, result = trial.config, trial.last_result or {}
        final = result.get(self.metric) if result.get("final") else None
        return {
            "method": config["method"],
            "depth": config["depth"],
            **{axis_name(key): config.get(key) for key in self.axes},
            "status": trial_status(trial.status, result),
            "epoch": result.get("epoch"),
            "readout": self._readouts.get(trial.trial_id),
            "final": final,
        }

    def summary(self, trials: list) -> str:
        rows = [self.row(trial) for trial in trials]
        counts: dict[str, int] = {}
        for row in rows:
            counts[row["status"]] = counts.get(row["status"], 0) + 1
        states = ", ".join(f"{n} {status}" for status, n in counts.items())
        head = f"trials: {states}; best finished: {best_finished(rows, self.axes)}"
        return "\n".join([head, *("  " + line for line in progress_table(rows))])

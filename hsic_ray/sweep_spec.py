"""What a depth sweep runs: plain data, so the sweep's command line builds and checks it without torch or Ray."""

from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass, field
from typing import Any

from hsic_ray.config import ConfigError, ExperimentConfig, build_config

METHODS = ("hsic", "backprop")
DEPTHS = (5, 10, 20, 50)  # a sweep's depths unless it names its own


def axis_name(key: str) -> str:
    """A grid key as a column or label names it: its last part (model.activation -> activation)."""
    return key.rsplit(".", 1)[-1]


@dataclass
class SweepSpec:
    """What to sweep: the grid, the settings every trial shares, and how trials are laid out."""

    preset: str = "deep_mlp"
    depths: list[int] = field(default_factory=lambda: list(DEPTHS))
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    grid: dict[str, list[Any]] = field(default_factory=dict)  # extra dotted config keys -> values
    overrides: dict[str, Any] = field(default_factory=dict)  # dotted config keys every trial shares
    stages_per_trial: int = 2
    gpus_per_stage: float = 0.0
    max_concurrent_trials: int = 1
    asha: bool = False
    output: str = "runs/sweep"

    def check(self) -> list[ExperimentConfig]:
        """The sweep's own settings, each named by its flag, then every trial's config, which it returns
        (`trial_configs`): a bad setting fails here, in the job's first second, not in every trial."""
        checks = [
            (self.depths and all(d >= 1 for d in self.depths), "--depths", self.depths, "one or more depths >= 1"),
            (
                self.methods and set(self.methods) <= set(METHODS),
                "--methods",
                self.methods,
                f"some of {', '.join(METHODS)}",
            ),
            (self.stages_per_trial >= 1, "--stages-per-trial", self.stages_per_trial, "a number >= 1"),
            (
                math.isfinite(self.gpus_per_stage) and self.gpus_per_stage >= 0,
                "--gpus-per-stage",
                self.gpus_per_stage,
                "a number >= 0 (fractions share a GPU)",
            ),
            (self.max_concurrent_trials >= 1, "--max-concurrent", self.max_concurrent_trials, "a number >= 1"),
            ("model.depth" not in self.grid, "--grid", "model.depth", "other keys: give depths with --depths"),
        ]
        for ok, flag, value, expected in checks:
            if not ok:
                raise ConfigError(f"{flag} {value} is invalid: expected {expected}")
        return self.trial_configs()

    def trial_configs(self) -> list[ExperimentConfig]:
        """Every trial's run config, with its stage layout, checked like any run's."""
        layout = {"ray.stages": self.stages_per_trial, "ray.gpus_per_stage": self.gpus_per_stage}
        return [
            build_config(self.preset, overrides={**self.overrides, **point, **layout, "model.depth": depth})
            for depth, point in itertools.product(self.depths, grid_points(self.grid))
        ]


def with_absolute_data_paths(key: str, value: Any) -> Any:
    """A setting as every trial must see it: Tune runs each trial in its own directory, where a data path
    relative to the sweep's working directory would name nothing (a URI, or a dataset's name, stays as it is)."""
    if key == "data.root" and isinstance(value, str):
        return os.path.abspath(os.path.expanduser(value))
    if key == "data.source" and isinstance(value, str):
        for scheme in ("npz:", "parquet:"):
            path = value[len(scheme) :]
            if value.startswith(scheme) and path and "://" not in path:
                return scheme + os.path.abspath(os.path.expanduser(path))
    return value


def grid_points(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of the grid's values, as dotted overrides ([{}] for an empty grid)."""
    return [dict(zip(grid, values)) for values in itertools.product(*grid.values())]

"""What a depth sweep runs: plain data, so the sweep's command line builds it without torch or Ray."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

METHODS = ("hsic", "backprop")
DEPTHS = (5, 10, 20, 50)  # a sweep's depths unless it names its own


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

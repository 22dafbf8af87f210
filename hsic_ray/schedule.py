"""Learning-rate schedules: the step size as a factor of the configured lr, a function of the step only.

One formula serves the HSIC stages (in process and on Ray, each stage from its own step count, which a
checkpoint restores) and the backprop baseline, so the two are compared under the same schedule.

* ``"constant"``: factor 1 throughout, as in the paper.
* ``"cosine"``: half a cosine from 1 at the first step down to 0 after the run's last (Loshchilov & Hutter's
  SGDR without restarts). Annealing the step lets the last steps settle instead of jittering around the
  optimum at full size (what it gains: docs/results.md, "paper_mlp against the authors' code").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from hsic_ray.config import LR_SCHEDULES, OptimConfig, TrainConfig
from hsic_ray.data import num_batches
from hsic_ray.sgd import SGD


@dataclass(frozen=True)
class LRSchedule:
    kind: str
    total_steps: int  # the run's planned steps: the cosine reaches 0 after the last

    def __post_init__(self):
        if self.kind not in LR_SCHEDULES:
            raise ValueError(f"unknown learning-rate schedule {self.kind!r}; expected one of {', '.join(LR_SCHEDULES)}")

    @property
    def is_constant(self) -> bool:
        return self.kind == "constant" or self.total_steps < 1

    @classmethod
    def for_run(cls, optim: OptimConfig, train: TrainConfig, train_samples: int) -> LRSchedule:
        """The schedule `optim` names, over the steps `train` plans on `train_samples` samples."""
        return cls(optim.schedule, planned_steps(train, train_samples))

    def factor(self, step: int) -> float:
        """The multiplier of lr for step `step` (0-based)."""
        if self.is_constant:
            return 1.0
        return 0.5 * (1.0 + math.cos(math.pi * min(step, self.total_steps) / self.total_steps))

    def apply(self, optimizer: SGD, step: int) -> None:
        """Set each param group's lr for step `step`: its initial lr times the factor. The initial lr is kept
        in the group as `initial_lr`, as PyTorch's own schedulers keep it, so an optimizer checkpoint holds it."""
        for group in optimizer.param_groups:
            group["lr"] = group.setdefault("initial_lr", group["lr"]) * self.factor(step)


def planned_steps(train: TrainConfig, train_samples: int) -> int:
    """Steps a run takes: every batch of every epoch, or train.max_steps if fewer."""
    steps = train.epochs * num_batches(train_samples, train.batch_size)
    return steps if train.max_steps is None else min(steps, train.max_steps)

"""When a run looks at itself: which epochs end with the per-epoch monitors (BatchNorm recalibration, the
information plane, the linear probes).

A user waits for the monitors as for training, and what they cost against an epoch differs by orders of
magnitude between a small MLP on a CPU and a deep conv net, or a GPU whose epochs take a second. So by default
the schedule is a share of the training time rather than a count of epochs: an epoch ends with the monitors
when, counting what the last round cost, they stay within `train.monitor_share` of the training time so far.
`train.monitor_every N` asks for every Nth epoch instead, and before training (epoch 0). The last epoch always
has them (the run's final records come from them), and the weights never depend on them.
"""

from __future__ import annotations

from hsic_ray.config import TrainConfig


class MonitorSchedule:
    def __init__(self, train: TrainConfig):
        self.every, self.share = train.monitor_every, train.monitor_share
        self.spent = 0.0  # seconds of monitor rounds so far
        self.last_cost: float | None = None  # the last round's seconds (None before the first)

    def due(self, epoch: int, last: bool, train_seconds: float) -> bool:
        """Whether epoch `epoch` (0: before training) ends with the monitors, `train_seconds` trained so far."""
        if last:
            return True
        if self.every is not None:
            return epoch % self.every == 0
        if epoch == 0:
            return False
        return self.last_cost is None or self.spent + self.last_cost <= self.share * train_seconds

    def ran(self, seconds: float) -> None:
        """A round of monitors took `seconds`."""
        self.spent += seconds
        self.last_cost = seconds

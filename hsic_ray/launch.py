"""A job's HSIC run, started the quick way: Ray comes up while the job imports torch.

Free of torch and Ray at import, like hsic_ray.cli: the job has parsed and validated its config by now.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hsic_ray import interrupt
from hsic_ray.config import ExperimentConfig


def run_hsic_job(cfg: ExperimentConfig, resume: bool = False) -> dict[str, Any]:
    """hsic_ray.experiment.run_hsic, with Ray connecting in the background from the start where it can
    (`connects_early`); returns the run's metrics."""
    connection = None
    with interrupt.exits_at_once():  # nothing to save yet, and Ray may be importing on another thread
        if connects_early(cfg, resume):
            from hsic_ray.distributed.background_connect import BackgroundConnection

            connection = BackgroundConnection.start(cfg.ray)
        from hsic_ray.experiment import run_hsic

    return run_hsic(cfg, resume=resume, connection=connection)


def connects_early(cfg: ExperimentConfig, resume: bool) -> bool:
    """Whether Ray can be started before the run's checks: on the Ray trainer, where the stage count (and so
    a new local cluster's size) is known without them. A run that continues one in its output directory
    takes the stage count of that run's checkpoint, read only once the directory is claimed."""
    if cfg.trainer != "ray" or resume:
        return False
    if cfg.ray.stages is not None or cfg.output is None:  # no output given: a new, timestamped directory
        return True
    return "://" not in cfg.output and not Path(cfg.output).exists()

"""Where a run starts: its claimed output directory, the settings an interrupted run there was started
with, and the checkpoint to continue from. Reads only, until every check of the run has passed and it
calls `RunStart.commit`."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from hsic_ray.config import ConfigError, ExperimentConfig, config_from_yaml_text, save_config
from hsic_ray.run import checkpoint
from hsic_ray.run import claim as run_claim
from hsic_ray.run.claim import Claim
from hsic_ray.run.directory import RunDirectory

log = logging.getLogger("hsic_ray")


def default_output(cfg: ExperimentConfig, method: str) -> str:
    return f"runs/{cfg.preset or method}-{time.strftime('%Y%m%d-%H%M%S')}"


# Settings a resumed run must share with the run it continues (epochs, max_steps, logging may change).
_RESUME_MUST_MATCH = ("data", "model", "hsic", "optim", "head", "train.batch_size", "train.seed")


def _setting(cfg: ExperimentConfig, dotted: str) -> Any:
    value: Any = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def saved_config(claim: Claim) -> ExperimentConfig:
    """The config of the interrupted run in the claimed directory."""
    where = claim.run.path("config.yaml")
    text = claim.saved_config_text()
    if text is None:
        raise ConfigError(f"{claim.run.uri} holds an interrupted run without its config.yaml; choose another --output")
    try:
        return config_from_yaml_text(text)
    except Exception as exc:  # ConfigError, or YAML's own parser errors
        raise ConfigError(f"{where} is broken ({str(exc).splitlines()[0]}); choose another --output") from None


def check_resumable(
    saved: ExperimentConfig, cfg: ExperimentConfig, uri: str, names: tuple[str, ...] = _RESUME_MUST_MATCH
) -> None:
    for name in names:
        if _setting(saved, name) != _setting(cfg, name):
            raise ConfigError(
                f"{uri} holds a run with different {name} settings ({_setting(saved, name)} there, "
                f"{_setting(cfg, name)} now); resume with the same settings or choose another --output"
            )


@dataclass
class RunStart:
    """Where a run starts: its claimed directory, and the checkpoint it continues from (None: step 0)."""

    claim: Claim
    step: int | None = None
    stages: int | None = None  # the checkpoint's stage count
    unreadable: dict[int, str] = field(default_factory=dict)  # newer checkpoints that do not load

    @property
    def run(self) -> RunDirectory:
        return self.claim.run

    def commit(self, cfg: ExperimentConfig) -> None:
        """Every check passed: write the run's first files, and set aside checkpoints that do not load."""
        self.claim.commit(save_config(cfg))
        for step, why in self.unreadable.items():
            name = checkpoint.set_aside(self.run, step)
            log.warning(
                "checkpoint at step %d cannot be loaded (%s): kept as %s, resuming from step %s",
                step,
                why,
                name,
                self.step,
            )
        if self.claim.interrupted and self.step is None:
            self.run.append_jsonl("metrics.jsonl", {"kind": "restart", "reason": "no complete checkpoint"})


def plan_start(cfg: ExperimentConfig, method: str, resume: bool = False) -> RunStart:
    """Claim the output directory and find the checkpoint to continue from; reads only.

    A directory with an unfinished run of the same kind is continued (from its newest checkpoint that
    loads, or from step 0 when it has none), if its settings match. See `hsic_ray.run.claim`.
    """
    claim = run_claim.claim(cfg.output or default_output(cfg, method), method, resume)
    if not claim.interrupted:
        return RunStart(claim)
    check_resumable(saved_config(claim), cfg, claim.run.uri)
    step, unreadable = checkpoint.resume_point(claim.run)
    if step is None and resume:
        raise checkpoint.CheckpointError(f"--resume: {claim.run.uri} holds no complete checkpoint to resume from")
    stages = None if step is None else checkpoint.read_manifest(claim.run, step)["stages"]
    return RunStart(claim, step, stages, unreadable)

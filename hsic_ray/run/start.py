"""Where a run starts: its claimed output directory, the settings an interrupted run there was started
with, and the checkpoint to continue from. Takes the directory's lock (hsic_ray.run.lock), and otherwise
reads only, until every check of the run has passed and it calls `RunStart.commit`.

One path for every kind of run: `plan_start` claims the directory and, for an interrupted run, checks its
settings and asks the run's `Resumption` where to continue. HSIC runs (and the in-process baseline) use
`CHECKPOINTS`, this package's own checkpoints; the Ray Train baseline passes its own
(`hsic_ray.train_backprop`)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from hsic_ray.config import ConfigError, ExperimentConfig, config_from_yaml_text, default_output, save_config
from hsic_ray.run import checkpoint
from hsic_ray.run import claim as run_claim
from hsic_ray.run.claim import Claim
from hsic_ray.run.directory import RunDirectory

log = logging.getLogger("hsic_ray")

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


class ResumePoint(Protocol):
    """What an interrupted run continues from, as its kind of checkpoint finds it."""

    @property
    def found(self) -> bool:
        """A checkpoint to continue from (False: the run starts again from its beginning)."""

    def commit(self, run: RunDirectory) -> None:
        """The run's checks passed: set aside or report the checkpoints that do not load."""


@dataclass(frozen=True)
class Resumption:
    """How a kind of run continues: what it must share with the run it continues, how it finds the point to
    continue from (reads only), and what `--resume` insists on, in its error."""

    must_match: tuple[str, ...]
    find: Callable[[RunDirectory], ResumePoint]
    wanted: str


@dataclass
class CheckpointResume:
    """The newest of this package's checkpoints (`hsic_ray.run.checkpoint`) that loads."""

    step: int | None = None  # None: step 0
    stages: int | None = None  # the checkpoint's stage count
    unreadable: dict[int, str] = field(default_factory=dict)  # newer checkpoints that do not load

    @property
    def found(self) -> bool:
        return self.step is not None

    def commit(self, run: RunDirectory) -> None:
        for step, why in self.unreadable.items():
            name = checkpoint.set_aside(run, step)
            log.warning(
                "checkpoint at step %d cannot be loaded (%s): kept as %s, resuming from step %s",
                step,
                why,
                name,
                self.step,
            )


def _find_checkpoint(run: RunDirectory) -> CheckpointResume:
    step, unreadable = checkpoint.resume_point(run)
    stages = None if step is None else checkpoint.read_manifest(run, step)["stages"]
    return CheckpointResume(step, stages, unreadable)


CHECKPOINTS = Resumption(_RESUME_MUST_MATCH, _find_checkpoint, "complete checkpoint")


@dataclass
class RunStart:
    """Where a run starts: its claimed directory, and what an interrupted run continues from (None: a fresh
    run)."""

    claim: Claim
    point: ResumePoint | None = None

    @property
    def run(self) -> RunDirectory:
        return self.claim.run

    def release(self) -> None:
        """The run ended (or stopped before it began): give up its directory's lock."""
        self.claim.release()

    def __enter__(self) -> RunStart:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def commit(self, cfg: ExperimentConfig) -> None:
        """Every check passed: write the run's first files, and set aside checkpoints that do not load."""
        self.claim.commit(save_config(cfg))
        if self.point is None:
            return
        self.point.commit(self.run)
        if not self.point.found:
            self.run.append_jsonl("metrics.jsonl", {"kind": "restart", "reason": "no complete checkpoint"})


def plan_start(
    cfg: ExperimentConfig, method: str, resume: bool = False, resumption: Resumption = CHECKPOINTS
) -> RunStart:
    """Lock and claim the output directory and find the point to continue from; writes only the lock, which
    the caller releases (`RunStart.release`, or `with` the returned start) and which goes on any error here.

    A directory with an unfinished run of the same kind is continued (from its newest checkpoint that
    loads, or from its beginning when it has none), if its settings match. See `hsic_ray.run.claim`.
    """
    claim = run_claim.take(cfg.output or default_output(cfg.preset, method), method, resume)
    try:
        if not claim.interrupted:
            return RunStart(claim)
        check_resumable(saved_config(claim), cfg, claim.run.uri, resumption.must_match)
        point = resumption.find(claim.run)
        if resume and not point.found:
            raise checkpoint.CheckpointError(f"--resume: {claim.run.uri} holds no {resumption.wanted} to resume from")
        return RunStart(claim, point)
    except BaseException:
        claim.release()
        raise

"""Claiming an output directory for a run: a fresh start, an interrupted run of the same kind to continue,
or refused. One place decides this for the HSIC job, the backprop baseline and the sweep.

`claim` only looks, so that every other check of a run can pass before its first file exists; the run
then calls `Claim.commit`, which marks the directory as the run's (`hsic-ray-run.json`) and saves its config.
A directory is never written into when it holds a finished run, a run of another kind, or files that are
not an hsic-ray run at all.

A run claims with `take`: it holds the directory's lock (hsic_ray.run.lock, one writer per directory) from
before it looks until `Claim.release`, so that no other run, or second resume of the same run, writes there
meanwhile. `claim` alone only looks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from hsic_ray.errors import NothingToResumeError, OutputExistsError
from hsic_ray.run.directory import RunDirectory, check_location
from hsic_ray.run.lock import LOCK_FILE, RunLock

MARKER = "hsic-ray-run.json"
KINDS = ("hsic", "backprop", "sweep")
FINISHED = {"hsic": "metrics.json", "backprop": "metrics.json", "sweep": "results.csv"}
# What identifies a run of each kind written before the marker existed.
LEGACY = {"hsic": "checkpoints", "backprop": "ray_train", "sweep": "tune"}
CONFIG = "config.yaml"
SWEEP_TRIALS = "trials"  # a sweep's directory of its trials' run directories, each named METHOD-TRIALID


@dataclass
class Claim:
    run: RunDirectory
    kind: str
    interrupted: bool  # an unfinished run of this kind is there, to be continued (or restarted)
    lock: RunLock | None = None  # held from `take` until `release`

    def release(self) -> None:
        """Give up the directory's lock (a claim that only looked holds none)."""
        if self.lock is not None:
            self.lock.release()

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def saved_config_text(self) -> str | None:
        return self.run.read_text(CONFIG) if self.interrupted and self.run.exists(CONFIG) else None

    def commit(self, config_text: str | None = None) -> None:
        """Mark the directory as this run's and save its config (both kept as they are when continuing)."""
        if self.interrupted:
            return
        self.run.write_json(MARKER, {"kind": self.kind, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        if config_text is not None:
            self.run.write_text(CONFIG, config_text)


def _kind_there(run: RunDirectory, names: list[str]) -> str | None:
    if MARKER in names:
        try:
            kind = run.read_json(MARKER).get("kind")
        except (OSError, ValueError, AttributeError):
            kind = None
        if kind not in KINDS:
            raise OutputExistsError(
                f"{run.uri}/{MARKER} is unreadable or names no kind of run; choose another --output"
            )
        return kind
    for kind, name in LEGACY.items():
        if name in names:
            return kind
    return None


def claim(output: str, kind: str, resume: bool = False) -> Claim:
    """Decide whether a `kind` run may use `output`; writes nothing.

    Fresh: the directory does not exist or is empty. Interrupted: it holds an unfinished run of the same
    kind (a finished sweep counts as interrupted under `resume`: Tune retries its failed trials). Anything
    else raises OutputExistsError naming what is there; `resume` without a run to continue raises
    NothingToResumeError.
    """
    return _look(RunDirectory(check_location(output)), kind, resume)


def take(output: str, kind: str, resume: bool = False) -> Claim:
    """Lock `output` for this run (RunLockedError, naming the holder, when another run has it), then claim
    it as `claim` does. The lock (and a directory it created, while empty) goes on any refusal; otherwise
    the caller releases the claim when the run ends."""
    run = RunDirectory(check_location(output))
    lock = RunLock.acquire(run)
    try:
        found = _look(run, kind, resume)
    except BaseException:
        lock.release()
        raise
    found.lock = lock
    return found


def _look(run: RunDirectory, kind: str, resume: bool) -> Claim:
    names = [n for n in run.list_dir() if not n.startswith((".tmp-", LOCK_FILE))]
    if not names:
        if resume:
            raise NothingToResumeError(f"--resume: {run.uri} holds no run to continue; drop --resume to start one")
        return Claim(run, kind, interrupted=False)
    there = _kind_there(run, names)
    if there is None:
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        raise OutputExistsError(
            f"{run.uri} holds files that are not an hsic-ray run ({shown}); choose a new or empty --output"
        )
    if there != kind:
        raise OutputExistsError(f"{run.uri} holds a {there} run, not a {kind} run; choose another --output")
    if FINISHED[kind] in names and not (kind == "sweep" and resume):
        raise OutputExistsError(
            f"{run.uri} already holds a finished run ({kind}: {FINISHED[kind]}); choose another --output"
        )
    return Claim(run, kind, interrupted=True)

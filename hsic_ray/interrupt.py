"""Stopping a run on SIGINT (Ctrl-C) or SIGTERM so that rerunning the same command continues it.

A job's body runs under `signals_stop_the_run` (hsic_ray.cli.run_job). Inside the training loops, which run
under `at_safe_points`, a signal only asks them to stop: they check `requested` between steps, finish the
batches in flight, write a checkpoint and raise `Interrupted` with the step. Anywhere else (loading data,
starting actors, the end of a run), and at a second signal, `Interrupted` is raised at once: what the run
had not checkpointed is redone when it is continued. During a job's imports (`exits_at_once`) the process
and those it started end at once instead. The job prints one line for it and exits 128 + the
signal's number (130 for SIGINT, 143 for SIGTERM).

Free of torch and Ray, so the command line can import it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator

import psutil

from hsic_ray.errors import Interrupted

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class _State:
    handling = False  # the handlers are installed (a job's body runs)
    deferred = 0  # depth of at_safe_points blocks: a signal waits for the loop's next safe point
    immediate = 0  # depth of exits_at_once blocks: a signal ends the process
    requested: int | None = None  # the signal received, if any


def _handle(signum: int, frame) -> None:
    if _State.immediate:
        print(Interrupted(signum), file=sys.stderr, flush=True)
        _kill_descendants()
        os._exit(128 + signum)
    if _State.requested is None and _State.deferred:
        _State.requested = signum
        return
    _State.requested = _State.requested or signum
    raise Interrupted(signum)


def _kill_descendants() -> None:
    """SIGKILL the processes this one started: a local Ray cluster starting beside the job's imports. Ray ties
    them to this process with PR_SET_PDEATHSIG, which each child sets for itself once it runs, so one forked
    just before this process ends would outlive it."""
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            child.kill()


@contextlib.contextmanager
def signals_stop_the_run() -> Iterator[None]:
    """SIGINT and SIGTERM raise Interrupted (or ask the loop to stop, see `at_safe_points`) while in the
    block; the previous handlers come back after it. Only the main thread can install handlers: elsewhere
    the block changes nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    _State.handling, _State.requested = True, None
    for s in SIGNALS:
        signal.signal(s, _handle)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _State.handling, _State.requested = False, None


@contextlib.contextmanager
def exits_at_once() -> Iterator[None]:
    """Inside the block a signal ends the process at once, and the processes it started, with the same line
    and exit code, instead of raising `Interrupted`: for a job's start-up, which has nothing to save yet. An
    exception raised at an arbitrary point of an import can be lost (in a weakref callback of the import
    machinery, which ignores it) and leave a module's import lock held, on which another thread importing
    (Ray, starting beside the job's imports) would wait for ever."""
    _State.immediate += 1
    try:
        yield
    finally:
        _State.immediate -= 1


def reclaim() -> None:
    """Install the handlers again inside `signals_stop_the_run`, after a library replaced them: ray.init puts
    its own C-level handler on SIGTERM, which dumps a stack and aborts the process."""
    if _State.handling and threading.current_thread() is threading.main_thread():
        for s in SIGNALS:
            signal.signal(s, _handle)


def worker_exits_quietly() -> None:
    """In a Ray worker process (a stage actor, a sweep trial, a backprop worker): Ray stops a worker it no
    longer needs with SIGTERM, whose handler raises SystemExit. Where that lands in code that cannot raise (a
    weakref's callback, a finalizer), Python prints it as "Exception ignored in ...: SystemExit" with a
    traceback, and Ray forwards that to the driver's terminal at the end of a run that succeeded. It is an
    exit, not an error: such a SystemExit is dropped; every other unraisable exception is printed as before."""
    if getattr(sys.unraisablehook, "_drops_exits", False):
        return
    default = sys.unraisablehook

    def hook(unraisable) -> None:
        if not isinstance(unraisable.exc_value, SystemExit):
            default(unraisable)

    hook._drops_exits = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook


@contextlib.contextmanager
def at_safe_points() -> Iterator[None]:
    """Inside the block a (first) signal waits for the loop's next `check`."""
    _State.deferred += 1
    try:
        yield
    finally:
        _State.deferred -= 1
    if _State.requested is not None and _State.handling:
        raise Interrupted(_State.requested)  # it came after the loop's last check


def requested() -> bool:
    """Whether a signal asked the run to stop."""
    return _State.requested is not None


def stop(step: int | None) -> None:
    """The loop reached a safe point after a signal (and wrote its checkpoint): end the run."""
    raise Interrupted(_State.requested or signal.SIGINT, step)


def stop_if_requested(step: int | None) -> None:
    """At a safe point (after the checkpoint of `step`): end the run if a signal asked for it."""
    if requested():
        stop(step)

"""Where a run's wall time goes: seconds per phase, from the process's start to its last file.

A user waits for the whole command, not for the training loop; metrics.json's `phase_seconds` says what the
rest was (start-up, each per-epoch monitor, the head, evaluation, writing), and benchmarks/wall_clock.py reads
it. Phases are named by the code that runs them; a phase entered twice adds up, and a phase inside another
counts for itself only (the outer one's seconds leave it out), so the phases add up to the wall time.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import psutil


class Timeline:
    def __init__(self, process_started: float | None = None):
        """`process_started`: the Unix time the process began (default: this process's, from the OS); the
        time until now is the `before_run` phase (in a job: the interpreter, its imports, argument parsing)."""
        self.process_started = psutil.Process().create_time() if process_started is None else process_started
        self.seconds: dict[str, float] = {"before_run": max(0.0, time.time() - self.process_started)}
        self._inner: list[float] = []  # per open phase: the seconds of the phases inside it so far

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        self._inner.append(0.0)
        try:
            yield
        finally:
            elapsed = time.perf_counter() - started
            self.add(name, elapsed - self._inner.pop())
            if self._inner:
                self._inner[-1] += elapsed

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def summary(self) -> dict[str, float]:
        """Seconds per phase, and `total`: the process's age now (its phases, plus what no phase covers)."""
        return {**self.seconds, "total": time.time() - self.process_started}

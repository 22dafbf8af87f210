"""One writer per run directory: the lock a run holds on its output from its claim to its exit.

On a local disk the lock is a file, `.hsic-ray-lock`, created with O_CREAT | O_EXCL (atomic: of two runs
started together exactly one creates it) and naming its holder: host, pid, the pid's start time and when it
took the lock. Object stores have no atomic create, so there the lock is a lease: the same record plus an
expiry, which the holder renews in a thread; a run that finds no live lease writes its own, waits a moment
and reads it back, and of two writers only the one whose lease is there goes on.

A lock is stale, and taken over with one log line, when its holder ran on this host and no longer runs (its
pid is gone, or belongs to a process started later), or when a lease expired. Any other lock refuses the
run, naming who holds it. The lock is released when the run ends, by an error or a signal too (the jobs turn
SIGINT and SIGTERM into an orderly stop, hsic_ray.interrupt); a SIGKILL leaves it behind, stale.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass

from hsic_ray.errors import RunLockedError
from hsic_ray.run.directory import RunDirectory

log = logging.getLogger("hsic_ray")

LOCK_FILE = ".hsic-ray-lock"
LEASE_SECONDS = 120.0  # an object-store lease lives this long unless renewed (every quarter of it)
LEASE_SETTLE_SECONDS = 1.0  # between writing a lease and reading it back: a concurrent writer shows by then
_HELD: set[str] = set()  # locks held by this process (by location): one process may run several runs


@dataclass(frozen=True)
class Holder:
    """Who holds a lock: what the lock file (or lease) says."""

    host: str
    pid: int
    since: str
    token: str
    started: float | None = None  # the pid's start time (seconds since boot), to tell a reused pid
    expires: float | None = None  # leases only: time.time() after which the lease is stale

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host} since {self.since}"

    @classmethod
    def me(cls, lease: bool) -> Holder:
        return cls(
            host=socket.gethostname(),
            pid=os.getpid(),
            since=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            token=uuid.uuid4().hex,
            started=_process_started(os.getpid()),
            expires=time.time() + LEASE_SECONDS if lease else None,
        )

    def encode(self) -> bytes:
        return (json.dumps(asdict(self)) + "\n").encode()


def _decode(data: bytes) -> Holder | None:
    try:
        return Holder(**json.loads(data))
    except (ValueError, TypeError):
        return None  # torn by a crash mid-write, or not a lock this version wrote


def _process_started(pid: int) -> float | None:
    """When `pid` started, in clock ticks since boot (Linux), or None where /proc does not say."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return float(f.read().rpartition(")")[2].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _runs(holder: Holder) -> bool:
    """Whether the holder's process (on this host) still runs."""
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it runs
    started = _process_started(holder.pid)
    return holder.started is None or started is None or started == holder.started


class RunLock:
    """The lock on one run directory; `acquire` takes it (or raises RunLockedError), `release` gives it up."""

    def __init__(self, run: RunDirectory):
        self.run = run
        self.key = run.path(LOCK_FILE)
        self.lease = run.local_path(LOCK_FILE) is None
        self.holder = Holder.me(self.lease)
        self._created: list[str] = []  # directories the lock created, removed again if still empty
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    @classmethod
    def acquire(cls, run: RunDirectory) -> RunLock:
        lock = cls(run)
        if lock.key in _HELD:
            raise lock._refusal(lock._read() or lock.holder)
        if lock.lease:
            lock._acquire_lease()
        else:
            lock._acquire_file()
        _HELD.add(lock.key)
        return lock

    def _stale(self, holder: Holder) -> bool:
        if holder.host == socket.gethostname() and (holder.pid == os.getpid() or not _runs(holder)):
            return True  # this process holds no lock here (checked first), so a lock naming it is left over
        return holder.expires is not None and holder.expires < time.time()

    def _refusal(self, holder: Holder) -> RunLockedError:
        return RunLockedError(
            f"{self.run.uri} is in use by another run ({holder.describe()}); wait for it to end or choose "
            f"another --output (if that run is gone, delete {self.key})"
        )

    def _took_over(self, holder: Holder) -> None:
        why = "its lease expired" if holder.host != socket.gethostname() else "that process no longer runs"
        log.warning("taking over the lock on %s from %s: %s", self.run.uri, holder.describe(), why)

    def _read(self) -> Holder | None:
        try:
            return _decode(self.run.read_bytes(LOCK_FILE))
        except (FileNotFoundError, OSError):
            return None

    # --- a lock file on a local disk ------------------------------------------------------------------

    def _acquire_file(self) -> None:
        path = self.run.local_path(LOCK_FILE)
        self._created = _make_dirs(os.path.dirname(path))
        for _ in range(3):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                seen, holder = self._read_settled(path)
                if holder is not None and not self._stale(holder):
                    self.release()
                    raise self._refusal(holder) from None
                if holder is not None:
                    self._took_over(holder)
                _remove_if_unchanged(path, seen)
                continue
            with os.fdopen(fd, "wb") as f:
                f.write(self.holder.encode())
                f.flush()
                os.fsync(f.fileno())
            return
        self.release()
        raise RunLockedError(f"{self.run.uri} is being claimed by other runs at this moment; try again")

    @staticmethod
    def _read_settled(path: str) -> tuple[bytes, Holder | None]:
        """The lock file's bytes and holder; a file just created and not yet written gets a moment."""
        for wait in (0.0, 0.2, 1.0):
            time.sleep(wait)
            try:
                with open(path, "rb") as f:
                    seen = f.read()
            except FileNotFoundError:
                return b"", None
            holder = _decode(seen)
            if holder is not None:
                return seen, holder
        return seen, None  # torn by a crash between create and write: nobody holds it

    # --- a lease on an object store -------------------------------------------------------------------

    def _acquire_lease(self) -> None:
        there = self._read()
        if there is not None and not self._stale(there):
            raise self._refusal(there)
        if there is not None:
            self._took_over(there)
        self.run.write_bytes(LOCK_FILE, self.holder.encode())
        time.sleep(LEASE_SETTLE_SECONDS)
        there = self._read()
        if there is None or there.token != self.holder.token:
            raise self._refusal(there or self.holder)
        self._renewer = threading.Thread(target=self._renew, name="hsic-ray-lease", daemon=True)
        self._renewer.start()

    def _renew(self) -> None:
        while not self._stop.wait(LEASE_SECONDS / 4):
            there = self._read()
            if there is None or there.token != self.holder.token:
                log.warning("lost the lease on %s to %s", self.run.uri, there.describe() if there else "nobody")
                return
            self.holder = Holder(**{**asdict(self.holder), "expires": time.time() + LEASE_SECONDS})
            self.run.write_bytes(LOCK_FILE, self.holder.encode())

    # --- giving it up ---------------------------------------------------------------------------------

    def release(self) -> None:
        """Give the lock up (once; later calls do nothing). Removes directories it created that are empty."""
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
            self._renewer = None
        if self.key in _HELD:
            _HELD.discard(self.key)
            there = self._read()
            if there is not None and there.token == self.holder.token:
                self.run.fs.delete_file(self.key)
        for directory in reversed(self._created):
            try:
                os.rmdir(directory)
            except OSError:
                break  # not empty: the run wrote there
        self._created = []

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _make_dirs(directory: str) -> list[str]:
    """Create `directory` and missing parents; returns those created, outermost first."""
    missing = []
    while not os.path.isdir(directory):
        missing.append(directory)
        directory = os.path.dirname(directory)
    for path in reversed(missing):
        try:
            os.mkdir(path)
        except FileExistsError:
            pass
    return list(reversed(missing))


def _remove_if_unchanged(path: str, seen: bytes) -> None:
    """Remove the stale lock file that held `seen`, but never a lock another run created since."""
    aside = f"{path}.stale-{uuid.uuid4().hex}"
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return  # another run removed it first
    with open(aside, "rb") as f:
        unchanged = f.read() == seen
    if not unchanged:  # another run took it meanwhile: put its lock back
        try:
            os.link(aside, path)
        except FileExistsError:
            pass
    os.unlink(aside)

"""Ray started while the job imports torch and checks its inputs.

Starting a local cluster is mostly waiting for its processes to come up, and importing torch is mostly one
core's work: side by side they take the longer of the two instead of their sum. A job starts the connection
(`BackgroundConnection.start`) before it imports torch and waits for it (`wait`) where the run needs Ray.
Its inputs are still checked first in the sense that matters: an error in them is reported as soon as it
is found, and the cluster started for nothing goes when the process ends.
"""

from __future__ import annotations

import logging
import threading

from hsic_ray import interrupt
from hsic_ray.config import RayConfig
from hsic_ray.distributed.connect import connect_for_stages


class _NotMainThreadNotice(logging.Filter):
    """ray.init warns, from any thread but the main one, that it leaves SIGTERM's handler alone: what this
    module wants (the job's own handler stays; `wait` puts it back over the C-level one Ray also installs)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "SIGTERM handler is not set" not in record.getMessage()


class BackgroundConnection:
    """`connect_for_stages(ray_cfg)` on a thread of its own."""

    def __init__(self, ray_cfg: RayConfig):
        self._ray_cfg = ray_cfg
        self._connected = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._connect, name="ray-connect", daemon=True)

    @classmethod
    def start(cls, ray_cfg: RayConfig) -> BackgroundConnection:
        connection = cls(ray_cfg)
        connection._thread.start()
        return connection

    def wait(self) -> None:
        """Until Ray is connected; raises what connecting raised."""
        self._connected.wait()
        if self._error is not None:
            raise self._error
        interrupt.reclaim()

    def _connect(self) -> None:
        notices = logging.getLogger("ray._private.worker")
        quiet = _NotMainThreadNotice()
        notices.addFilter(quiet)
        try:
            connect_for_stages(self._ray_cfg)
        except BaseException as exc:  # for `wait` to raise in the job's thread
            self._error = exc
        finally:
            notices.removeFilter(quiet)
            self._connected.set()
        # Ray starts a new local cluster's processes with PR_SET_PDEATHSIG, which Linux ties to the thread
        # that started them, not the process: they would be killed the moment this thread ended.
        threading.Event().wait()

"""Run the next items of a loop ahead of it, in a background thread.

The training loop computes each batch's factors (two kernels and their factors) before submitting it.
When the pipeline runs elsewhere (stage actors on Ray), the loop's thread mostly waits, and factors
computed meanwhile in another thread cost no wall time: `prefetched` keeps up to `depth` items ready.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

Item = TypeVar("Item")
Prepared = TypeVar("Prepared")

_DONE = object()


def prefetched(items: Iterable[Item], prepare: Callable[[Item], Prepared], depth: int) -> Iterator[Prepared]:
    """prepare(item) for each item, in order, computed up to `depth` items ahead in a daemon thread.

    Closing the generator early (a `break` in the loop) stops the thread; an exception raised while
    preparing is raised here, at the item it belongs to.
    """
    ready: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def offer(entry: tuple) -> bool:
        """Queue an entry unless the consumer has stopped; False once it has."""
        while not stop.is_set():
            try:
                ready.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in items:
                if not offer((prepare(item), None)):
                    return
            offer((_DONE, None))
        except BaseException as exc:  # handed to the consumer, which raises it
            offer((_DONE, exc))

    thread = threading.Thread(target=work, name="hsic-ray-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            value, error = ready.get()
            if error is not None:
                raise error
            if value is _DONE:
                return
            yield value
    finally:
        stop.set()
        thread.join()

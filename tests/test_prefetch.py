"""The loop's look-ahead: items prepared in a thread, in order, stopped when the loop stops."""

import threading
import time

import pytest

from hsic_ray.prefetch import prefetched


def _prefetch_threads():
    return [t for t in threading.enumerate() if t.name == "hsic-ray-prefetch"]


def test_items_come_prepared_and_in_order():
    assert list(prefetched(range(50), lambda i: i * i, depth=3)) == [i * i for i in range(50)]


def test_preparation_runs_ahead_of_the_loop_but_no_further_than_depth():
    prepared = []

    def prepare(i):
        prepared.append(i)
        return i

    items = prefetched(range(100), prepare, depth=4)
    assert next(items) == 0
    time.sleep(0.3)  # the thread fills the queue meanwhile, then waits
    assert 4 <= len(prepared) <= 6  # the item handed out, the queue's 4, and at most one being put
    items.close()


def test_breaking_out_of_the_loop_stops_the_thread():
    for i in prefetched(iter(range(10**9)), lambda i: i, depth=2):
        if i == 3:
            break
    time.sleep(0.2)
    assert not _prefetch_threads()


def test_an_error_while_preparing_is_raised_at_its_item():
    def prepare(i):
        if i == 2:
            raise ValueError("bad batch 2")
        return i

    seen = []
    with pytest.raises(ValueError, match="bad batch 2"):
        for i in prefetched(range(5), prepare, depth=2):
            seen.append(i)
    assert seen == [0, 1]
    assert not _prefetch_threads()

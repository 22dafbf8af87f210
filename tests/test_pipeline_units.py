"""Pieces of the Ray pipeline that need no cluster: how many batches per call, and the transport."""

import numpy as np
import pytest
import torch

from hsic_ray.distributed.ray_pipeline import CALL_SHARE, MAX_BATCHES_PER_CALL, choose_batches_per_call
from hsic_ray.distributed.transport import Transport


@pytest.mark.parametrize(
    "busy_ms, overhead_ms, expected",
    [
        (130.0, 6.5, 1),  # a 1024-wide stage on one core of the 2-core machine: Ray's cost is already small
        (20.0, 6.0, 3),
        (2.0, 1.5, 8),
        (0.5, 2.0, MAX_BATCHES_PER_CALL),  # capped: the object store holds 2 x stages x k batches per stage
        (5.0, 0.0, 1),  # no wait between calls: nothing to amortise
    ],
)
def test_batches_per_call_keep_the_wait_between_calls_under_a_tenth_of_the_compute(busy_ms, overhead_ms, expected):
    k = choose_batches_per_call(busy_ms / 1e3, overhead_ms / 1e3, stages=4)
    assert k == expected
    if k < MAX_BATCHES_PER_CALL:  # the smallest k that keeps the share
        assert overhead_ms <= CALL_SHARE * k * busy_ms + 1e-9
        assert k == 1 or overhead_ms > CALL_SHARE * (k - 1) * busy_ms


def test_frequent_drains_of_a_deep_pipeline_call_for_smaller_groups():
    # A 1 ms GPU step and 1.5 ms of Ray per call want 15 batches a call. Drained every 100 batches (a
    # checkpoint), 8 stages idle 7 groups' time per drain: (100 + 7k)(1 + 1.5 / k) ms is least at k = 5.
    busy, overhead = 1e-3, 1.5e-3
    assert choose_batches_per_call(busy, overhead, stages=8) == 15
    assert choose_batches_per_call(busy, overhead, stages=8, drain_every=100) == 5
    assert choose_batches_per_call(busy, overhead, stages=2, drain_every=100) == 12  # (100 + k)(1 + 1.5 / k)
    # Long runs between drains, or a single stage (no fill to pay), leave the share's choice as it is.
    assert choose_batches_per_call(busy, overhead, stages=8, drain_every=100_000) == 15
    assert choose_batches_per_call(busy, overhead, stages=1, drain_every=10) == 15


def test_cpu_transport_gives_writable_tensors_and_arrays_back():
    transport = Transport(torch.device("cpu"))
    wire = np.arange(12, dtype=np.float32).reshape(3, 4)
    wire.setflags(write=False)  # as Ray hands out object-store arrays
    tensor = transport.receive(wire)
    tensor += 1  # owned memory: the object store's copy is untouched
    assert wire[0, 0] == 0 and tensor[0, 0] == 1
    [sent] = transport.send([tensor])
    np.testing.assert_array_equal(sent, wire + 1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned staging buffers are for CUDA stages")
def test_cuda_transport_round_trip_through_pinned_buffers():
    transport = Transport(torch.device("cuda"))
    wires = [np.random.default_rng(i).random((256, 512), dtype=np.float32) for i in range(4)]
    # Two batches through one named buffer, then two through buffers of their own, nothing waited for in
    # between: a buffer is not overwritten before its copy to the device is done.
    received = [transport.receive(w, "x") for w in wires[:2]] + [
        transport.receive(w, f"x{i}") for i, w in enumerate(wires[2:])
    ]
    sent = transport.send([t * 2 for t in received])  # one buffer per slot, one wait
    for w, s in zip(wires, sent):
        np.testing.assert_allclose(s, 2 * w)

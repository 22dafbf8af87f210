"""Pieces of the Ray pipeline that need no cluster: how many batches per call, and the transport."""

import numpy as np
import pytest
import torch

from hsic_ray.config import RayConfig
from hsic_ray.distributed.batches_per_call import (
    CALL_SHARE,
    GROUPS_BEFORE_CHOOSING,
    MAX_BATCHES_PER_CALL,
    BatchesPerCall,
    choose_batches_per_call,
)
from hsic_ray.distributed.transport import Transport
from hsic_ray.objective import KernelFactors


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


def _reports(busy_per_batch, idle, batches=1):
    """One group's reports from two stages, the second the slowest."""
    fast = {"busy": 0.5 * busy_per_batch * batches, "idle": 9.0, "stats": [None] * batches}
    return [fast, {"busy": busy_per_batch * batches, "idle": idle, "stats": [None] * batches}]


def test_batches_per_call_are_chosen_from_the_slowest_stages_calls_after_the_first():
    paces = []

    def drain_every(seconds_per_batch):
        paces.append(seconds_per_batch)
        return 100

    chooser = BatchesPerCall(RayConfig(), stages=2, drain_every=drain_every)
    assert (chooser.value, chooser.max_in_flight, chooser.settled) == (1, 4, False)
    # The first group's wait is the pipeline's fill, not Ray's cost per call: it is not counted.
    times = [(0.5, 5.0)] + [(1e-3, 1.5e-3), (2e-3, 1e-3), (1e-3, 1.5e-3), (1e-3, 2e-3), (4e-3, 1.5e-3)]
    assert len(times) == GROUPS_BEFORE_CHOOSING
    for busy, idle in times[:-1]:
        assert chooser.record(_reports(busy, idle)) is None and not chooser.settled
    chosen = chooser.record(_reports(*times[-1]))
    assert chooser.settled and paces == [1e-3]  # the medians of the counted groups: 1 ms, 1.5 ms
    assert chooser.value == choose_batches_per_call(1e-3, 1.5e-3, 2, 100) == 12
    assert chosen == {
        "kind": "batches_per_call",
        "batches_per_call": 12,
        "max_in_flight": 2 * 2 * 12,
        "step_ms": pytest.approx(1.0),
        "call_overhead_ms": pytest.approx(1.5),
    }
    assert chooser.max_in_flight == 48 and chooser.record(_reports(1.0, 1.0)) is None and chooser.value == 12


def test_batches_per_call_and_in_flight_bound_as_set_are_final():
    chooser = BatchesPerCall(RayConfig(batches_per_call=3), stages=4)
    assert chooser.settled and (chooser.value, chooser.max_in_flight) == (3, 24)
    assert chooser.record(_reports(1.0, 1.0)) is None and chooser.value == 3
    assert BatchesPerCall(RayConfig(max_in_flight=5), stages=4).max_in_flight == 5


def test_cpu_transport_gives_writable_tensors_and_arrays_back():
    transport = Transport(torch.device("cpu"))
    wire = np.arange(12, dtype=np.float32).reshape(3, 4)
    wire.setflags(write=False)  # as Ray hands out object-store arrays
    tensor = transport.receive(wire)
    tensor += 1  # owned memory: the object store's copy is untouched
    assert wire[0, 0] == 0 and tensor[0, 0] == 1
    [sent] = transport.send([tensor])
    np.testing.assert_array_equal(sent, wire + 1)


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")),
    ],
)
@pytest.mark.parametrize("with_x", [True, False])  # False: an estimator that compresses against Z itself
def test_a_first_stage_sends_its_factors_on_as_the_next_stage_receives_them(device, with_x):
    transport, after = Transport(torch.device(device)), Transport(torch.device(device))
    rng = np.random.default_rng(0)
    factors = [
        KernelFactors(
            torch.from_numpy(rng.random((8, 8), dtype=np.float32)).to(device) if with_x else None,
            torch.from_numpy(rng.random((8, 8), dtype=np.float32)).to(device),
        )
        for _ in range(3)
    ]
    wire = transport.send_factors(factors)
    for slot, (sent, received) in enumerate(zip(factors, (after.receive_factors(w, i) for i, w in enumerate(wire)))):
        assert (received.x_factor is None) == (sent.x_factor is None), slot
        if sent.x_factor is not None:
            assert torch.equal(received.x_factor.cpu(), sent.x_factor.cpu()), slot
        assert torch.equal(received.y_factor.cpu(), sent.y_factor.cpu()), slot


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

"""Pieces of the Ray pipeline that need no cluster: how many batches per call, and the transport."""

import numpy as np
import pytest
import torch

from hsic_ray.distributed.pipeline import CALL_SECONDS, MAX_BATCHES_PER_CALL, choose_batches_per_call
from hsic_ray.distributed.transport import Transport


@pytest.mark.parametrize("busy_ms, expected", [(100.0, 1), (20.0, 1), (10.0, 2), (2.0, 10), (0.5, MAX_BATCHES_PER_CALL)])
def test_batches_per_call_keep_the_call_cost_under_a_tenth_of_the_compute(busy_ms, expected):
    k = choose_batches_per_call(busy_ms / 1e3)
    assert k == expected
    if k < MAX_BATCHES_PER_CALL:
        assert CALL_SECONDS <= 0.1 * k * busy_ms / 1e3 + 1e-12


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
    received = [transport.receive(w, "x") for w in wires[:2]] + [transport.receive(w, f"x{i}") for i, w in enumerate(wires[2:])]
    sent = transport.send([t * 2 for t in received])  # one buffer per slot, one wait
    for w, s in zip(wires, sent):
        np.testing.assert_allclose(s, 2 * w)

"""How tensors cross between a stage actor's device and Ray's object store: the one place that knows.

Activations travel as CPU numpy arrays: Ray reads them zero-copy from shared memory on the same node (a
CUDA tensor in the object store would be rebuilt on the sender's device, which the receiver may not have).
On a GPU stage each hop is one copy from host to device and one back, through page-locked staging
buffers, so the copies run as DMA without an extra pageable bounce. Another transport (Ray's direct GPU
transport, once it is out of alpha) would replace this module and nothing else.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import Tensor


class Transport:
    """Receive arrays onto `device` and send tensors back as arrays, reusing pinned buffers on CUDA."""

    def __init__(self, device: torch.device):
        self.device = device
        self._staging: dict[tuple[str, tuple[int, ...], torch.dtype], Tensor] = {}
        self._copied: Optional[torch.cuda.Event] = None

    def receive(self, array: np.ndarray) -> Tensor:
        if self.device.type != "cuda":
            # Object-store arrays are read-only views of shared memory; torch needs memory it may own.
            return torch.from_numpy(np.array(array, copy=True))
        staging = self._buffer("in", array.shape, torch.from_numpy(array[:0]).dtype)
        self._wait_for_last_copy()  # the previous copy out of this buffer must be done before reuse
        staging.numpy()[...] = array
        on_device = staging.to(self.device, non_blocking=True)
        self._record_copy()
        return on_device

    def send(self, tensor: Tensor, slot: int = 0) -> np.ndarray:
        """The tensor as a host array. On CUDA it is a view of the staging buffer of its `slot` (its place
        in the call's group of batches), which the next call overwrites: Ray serialises a call's return
        value before the actor runs its next call."""
        if tensor.device.type != "cuda":
            return tensor.detach().numpy()
        staging = self._buffer(f"out{slot}", tuple(tensor.shape), tensor.dtype)
        staging.copy_(tensor.detach(), non_blocking=True)
        self._record_copy()
        self._wait_for_last_copy()
        return staging.numpy()

    def _buffer(self, direction: str, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        key = (direction, tuple(shape), dtype)
        if key not in self._staging:
            self._staging[key] = torch.empty(shape, dtype=dtype, pin_memory=True)
        return self._staging[key]

    def _record_copy(self) -> None:
        self._copied = torch.cuda.Event()
        self._copied.record()

    def _wait_for_last_copy(self) -> None:
        if self._copied is not None:
            self._copied.synchronize()

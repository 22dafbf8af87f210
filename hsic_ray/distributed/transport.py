"""How tensors cross between a stage actor's device and Ray's object store: the one place that knows.

Activations travel as CPU numpy arrays: Ray reads them zero-copy from shared memory on the same node (a
CUDA tensor in the object store would be rebuilt on the sender's device, which the receiver may not have).
On a GPU stage each hop is one copy from host to device and one back, through page-locked staging
buffers, so the copies run as DMA without an extra pageable bounce. Another transport (Ray's direct GPU
transport, once it is out of alpha) would replace this module and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from hsic_ray.objective import KernelFactors

# A batch's kernel factors as they travel: (x_factor or None, y_factor).
WireFactors = tuple[np.ndarray | None, np.ndarray]


def factors_to_numpy(factors: KernelFactors) -> WireFactors:
    x = None if factors.x_factor is None else factors.x_factor.cpu().numpy()
    return x, factors.y_factor.cpu().numpy()


@dataclass
class _Staging:
    """A page-locked buffer, and its last copy to the device (to wait for before it is written again)."""

    host: Tensor
    copied: torch.cuda.Event | None = None


class Transport:
    """Receive arrays onto `device` and send tensors back as arrays, reusing pinned buffers on CUDA.

    Each staging buffer has a name (one per array a call handles at once, e.g. each batch of a group) and
    remembers its last copy, so a call can queue every batch's copy and step without waiting between them,
    and wait for the device once, when it sends its results back.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self._staging: dict[tuple[str, tuple[int, ...], torch.dtype], _Staging] = {}

    def receive(self, array: np.ndarray, buffer: str = "in") -> Tensor:
        """The array on the device; on CUDA copied through the staging buffer named `buffer`, asynchronously."""
        if self.device.type != "cuda":
            # Object-store arrays are read-only views of shared memory; torch needs memory it may own.
            return torch.from_numpy(np.array(array, copy=True))
        staging = self._buffer(buffer, array.shape, torch.from_numpy(array[:0]).dtype)
        if staging.copied is not None:
            staging.copied.synchronize()  # its previous copy to the device must be done before it is overwritten
        staging.host.numpy()[...] = array
        on_device = staging.host.to(self.device, non_blocking=True)
        staging.copied = torch.cuda.Event()
        staging.copied.record()
        return on_device

    def receive_factors(self, wire: WireFactors, slot: int = 0) -> KernelFactors:
        """A batch's factors on the device, through the staging buffers of the group's batch `slot`."""
        x_factor, y_factor = wire
        x_factor = None if x_factor is None else self.receive(x_factor, f"x_factor{slot}")
        return KernelFactors(x_factor, self.receive(y_factor, f"y_factor{slot}"))

    def send_factors(self, factors: list[KernelFactors]) -> list[WireFactors]:
        """Batches' factors as host arrays, for the stages after this one: sent as `send` sends tensors, so on
        CUDA every copy is queued through a staging buffer and waited for once, not one blocking copy each."""
        x_arrays = iter(self.send([f.x_factor for f in factors if f.x_factor is not None], "x_factor_out"))
        y_arrays = self.send([f.y_factor for f in factors], "y_factor_out")
        return [(None if f.x_factor is None else next(x_arrays), y) for f, y in zip(factors, y_arrays)]

    def send(self, tensors: list[Tensor], buffer: str = "out") -> list[np.ndarray]:
        """The tensors as host arrays. On CUDA they are views of the staging buffers `buffer0`, `buffer1`,
        ..., which the next send overwrites (Ray serialises a call's return value before the actor runs its
        next call); the copies are queued together and waited for once."""
        if self.device.type != "cuda":
            return [tensor.detach().numpy() for tensor in tensors]
        arrays = []
        for slot, tensor in enumerate(tensors):
            staging = self._buffer(f"{buffer}{slot}", tuple(tensor.shape), tensor.dtype)
            staging.host.copy_(tensor.detach(), non_blocking=True)
            arrays.append(staging.host.numpy())
        torch.cuda.current_stream(self.device).synchronize()
        return arrays

    def _buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> _Staging:
        key = (name, tuple(shape), dtype)
        if key not in self._staging:
            self._staging[key] = _Staging(torch.empty(shape, dtype=dtype, pin_memory=True))
        return self._staging[key]

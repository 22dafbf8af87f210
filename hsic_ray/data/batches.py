"""Seeded batches of a split: full batches only (drop_last: the HSIC estimate wants a constant batch
size), in an order fixed by (seed, epoch), resumable at any batch index within an epoch."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from hsic_ray.data.arrays import DataError


@dataclass(frozen=True, eq=False)
class Batch:
    x: torch.Tensor  # float32 [B, C, H, W] in [0, 1]
    y: torch.Tensor  # int64 [B]
    epoch: int
    index: int  # batch index within the epoch

    def to(self, device: torch.device | str) -> Batch:
        """The same batch with its images and labels on `device`, copied asynchronously.

        To a GPU the copy goes from page-locked memory (torch's cached pinned blocks): from pageable memory
        CUDA may wait for the stream's queued work first, and the loop would wait for the step before."""

        def move(t: torch.Tensor) -> torch.Tensor:
            if torch.device(device).type == "cuda" and t.device.type == "cpu":
                t = t.pin_memory()
            return t.to(device, non_blocking=True)

        return Batch(move(self.x), move(self.y), self.epoch, self.index)


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The sample order of one epoch: a permutation of range(n) fixed by (seed, epoch) alone."""
    if n < 0 or epoch < 0:
        raise ValueError(f"epoch_permutation needs n >= 0 and epoch >= 0, got n={n}, epoch={epoch}")
    # SeedSequence takes non-negative entropy only: fold a negative seed into the unsigned 64-bit range.
    return np.random.default_rng([int(seed) % 2**64, int(epoch)]).permutation(n)


def num_batches(n: int, batch_size: int) -> int:
    """Full batches in n samples (the last partial batch is dropped: HSIC wants a constant batch size)."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} is invalid: expected an integer >= 1")
    return max(0, n) // batch_size


def to_tensor(x: np.ndarray) -> torch.Tensor:
    """uint8 pixels -> float32 / 255 (ToTensor semantics, no normalisation); floats -> float32."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.dtype == np.uint8:
        return torch.from_numpy(x.astype(np.float32)).div_(255.0)
    if np.issubdtype(x.dtype, np.floating):
        arr = np.ascontiguousarray(x, dtype=np.float32)
        if not arr.flags.writeable:
            arr = arr.copy()
        return torch.from_numpy(arr)
    raise DataError(f"to_tensor got images of dtype {x.dtype}: expected uint8 pixels or floats in [0, 1]")


EVAL_CHUNK = 1024  # samples per forward pass when a whole split is read


def split_chunks(x: np.ndarray, size: int = EVAL_CHUNK) -> Iterator[torch.Tensor]:
    """A whole split as input tensors of at most `size` samples each, in order (for evaluation)."""
    for i in range(0, len(x), size):
        yield to_tensor(x[i : i + size])


def fixed_subset(
    x: np.ndarray, y: np.ndarray, n: int | None, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """`n` samples of a split drawn from `rng`, in the split's order (all of them where the split is
    smaller); None: the split itself, drawing nothing."""
    if n is None:
        return x, y
    idx = fixed_indices(len(y), n, rng)
    return x[idx], y[idx]


def fixed_indices(total: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """The sorted indices of `n` of `total` samples drawn from `rng` (every index where `total` is smaller)."""
    return np.sort(rng.choice(total, min(n, total), replace=False))


def iterate_batches(
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int,
    seed: int,
    epoch: int,
    start: int = 0,
    shuffle: bool = True,
) -> Iterator[Batch]:
    """Full batches of one epoch in the order of `epoch_permutation(len(x), seed, epoch)`.

    Starts at batch index `start` (resuming mid-epoch yields exactly the batches not yet seen); the last
    partial batch is dropped. With shuffle=False the order is the array order.
    """
    n = len(x)
    if len(y) != n:
        raise DataError(f"iterate_batches got {n} images but {len(y)} labels: expected one label per image")
    total = num_batches(n, batch_size)
    if total == 0:
        raise DataError(
            f"{n} samples make no full batch of batch_size={batch_size}: lower train.batch_size to at most {n}"
        )
    if not 0 <= start <= total:
        raise ValueError(
            f"start={start} is invalid: an epoch of {n} samples has batches 0..{total - 1} (start <= {total})"
        )
    order = epoch_permutation(n, seed, epoch) if shuffle else np.arange(n)
    for index in range(start, total):
        rows = order[index * batch_size : (index + 1) * batch_size]
        yield Batch(
            x=to_tensor(x[rows]),
            y=torch.from_numpy(np.asarray(y[rows], dtype=np.int64)),
            epoch=epoch,
            index=index,
        )

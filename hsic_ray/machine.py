"""This machine's cores and memory, as the processes and threads of a run ask for them, how a process reuses
the memory it frees, and whether its GPUs are shared through NVIDIA's Multi-Process Service.

Free of torch, so that a job checks a local cluster's size before it imports torch (it starts Ray while
torch imports; hsic_ray.distributed.background_connect)."""

from __future__ import annotations

import ctypes
import os

import psutil

from hsic_ray.errors import ResourceError

GIB = 1024**3
# A Ray worker that imports (CUDA-built) torch holds about this much memory of its own.
PROCESS_BYTES = int(0.7 * GIB)
# glibc's mallopt parameters (malloc.h): the most blocks mapped on their own, and the free space kept at the heap's top.
_M_MMAP_MAX = -4
_M_TRIM_THRESHOLD = -1
# Where NVIDIA's MPS control daemon makes its pipes unless CUDA_MPS_PIPE_DIRECTORY says otherwise.
MPS_PIPE_DIRECTORY = "/tmp/nvidia-mps"


def machine_cores() -> int:
    return os.cpu_count() or 1


def threads_for(cpus: float) -> int:
    """Torch threads for a process that reserved `cpus`: at least one, never more than the machine's cores."""
    return max(1, min(int(cpus), machine_cores()))


def glibc_version() -> str | None:
    """This process's C library, where it is glibc ("glibc 2.36"); None elsewhere."""
    try:
        return os.confstr("CS_GNU_LIBC_VERSION") or None
    except (AttributeError, ValueError):  # no confstr (Windows), or no such name (macOS, musl)
        return None


def keep_freed_memory() -> bool:
    """Have this process's malloc (glibc's) reuse the memory it frees rather than return it to the kernel: no
    block gets a mapping of its own, and the heap is never trimmed. Returns whether it applies (glibc only).

    A training step allocates and frees the same large tensors every step (a stage's kernel systems are
    [layers, m, m]: tens of MB). glibc maps a large block on its own and unmaps it when freed, and trims the
    heap's free top, so each step would page-fault its whole working set in again: for a deep stage on a CPU,
    a large share of its step (docs/results.md, "Memory reused between steps"). A process keeps its peak
    memory instead, as PyTorch's CUDA allocator does on a GPU.
    """
    if glibc_version() is None:  # macOS, musl, Windows: their own allocators' ways
        return False
    libc = ctypes.CDLL(None)  # this process's own symbols, glibc's among them: no library search (a subprocess)
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, -1))


def check_local_cluster(processes: int, cpus_per_process: float) -> None:
    """A local cluster is this machine: refuse more processes than its memory holds, or a process that asks
    for more CPUs than it has cores (Ray would grant the logical CPUs and the process would oversubscribe)."""
    cores = machine_cores()
    if cpus_per_process > cores:
        raise ResourceError(
            f"a process asks for {cpus_per_process:g} CPUs and this machine has {cores} cores; ask for at most "
            f"{cores} per stage or worker, or join a larger cluster with --ray-address"
        )
    need, have = processes * PROCESS_BYTES, psutil.virtual_memory().available
    if need > have:
        raise ResourceError(
            f"{processes} Ray worker processes need about {need / GIB:.1f} GiB and this machine has "
            f"{have / GIB:.1f} GiB free; use at most {max(1, have // PROCESS_BYTES)} stages or workers here, or "
            "join a larger cluster with --ray-address"
        )


def mps_running() -> bool:
    """Whether a CUDA process started here would run through an MPS server (its control daemon's pipe is
    there): then processes on one GPU share one context, where without it the GPU time-slices theirs."""
    pipes = os.environ.get("CUDA_MPS_PIPE_DIRECTORY", MPS_PIPE_DIRECTORY)
    return os.path.exists(os.path.join(pipes, "control"))

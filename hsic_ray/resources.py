"""What a run asks of the machine it starts on: memory for the network and its kernels, and disk for its
checkpoints, checked against the real machine before anything is built or started (its processes and threads:
hsic_ray.machine)."""

from __future__ import annotations

import dataclasses

import psutil
import torch

from hsic_ray.config import ConfigError, ExperimentConfig, ModelConfig
from hsic_ray.machine import GIB
from hsic_ray.models import Shape, build_network
from hsic_ray.run.checkpoint import storage_bytes
from hsic_ray.run.location import check_free_space

# Copies of every parameter a run keeps: weights, gradients, momentum, and one in flight to a checkpoint.
PARAMETER_COPIES = 4
# m x m float32 matrices a layer's kernel and its solve hold at once (kernel, centred kernel, inverse,
# gradients), on the training batch and on the information plane's batch.
KERNEL_MATRICES = 6
# Python objects per layer (modules, optimizer state, checkpoint entries), whatever its size.
LAYER_OVERHEAD_BYTES = 64 * 1024


def _parameter_count(model: ModelConfig, input_shape: Shape, depth: int) -> int:
    model = dataclasses.replace(model, depth=depth, init="default")
    with torch.device("meta"):  # shapes only: nothing is allocated
        return sum(p.numel() for p in build_network(model, input_shape).parameters())


def parameter_count(model: ModelConfig, input_shape: Shape) -> int:
    """The network's parameters, without building it at its depth."""
    # Parameters grow linearly with depth (every hidden block is alike): two small builds give the line.
    one, two = _parameter_count(model, input_shape, 1), _parameter_count(model, input_shape, 2)
    return one + (model.depth - 1) * (two - one)


def estimated_bytes(cfg: ExperimentConfig, input_shape: Shape) -> int:
    """Memory an HSIC run of `cfg` needs at least, for its parameters and its per-layer kernels."""
    parameters = parameter_count(cfg.model, input_shape)
    samples = cfg.train.batch_size**2 + cfg.train.eval_samples**2
    layers = cfg.num_hsic_layers
    return 4 * (PARAMETER_COPIES * parameters + KERNEL_MATRICES * layers * samples) + LAYER_OVERHEAD_BYTES * layers


def check_memory(cfg: ExperimentConfig, input_shape: Shape) -> None:
    """Refuse a network (or kernel batch) that cannot fit this machine, with the estimate, before building it."""
    need, have = estimated_bytes(cfg, input_shape), psutil.virtual_memory().total
    if need > have:
        raise ConfigError(
            f"this run needs about {need / GIB:,.1f} GiB (model.depth={cfg.model.depth}, "
            f"model.width={cfg.model.width}, "
            f"train.batch_size={cfg.train.batch_size}, train.eval_samples={cfg.train.eval_samples}) and this machine "
            f"has {have / GIB:.1f} GiB; lower --width, --depth, --batch-size or train.eval_samples"
        )


def check_disk(cfg: ExperimentConfig, input_shape: Shape) -> None:
    """Refuse an output on a local disk without room for the run's checkpoints and results (StorageError,
    naming need and free space), before anything is written."""
    need = storage_bytes(parameter_count(cfg.model, input_shape))
    check_free_space(cfg.output or "runs", need, f"its checkpoints and results (model.depth={cfg.model.depth})")

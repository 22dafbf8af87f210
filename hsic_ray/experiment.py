"""One run, end to end: check inputs, prepare the output directory, build the network, train, report.

Everything that can be checked cheaply (config, data, output directory) is checked before training starts,
by one preamble every run shares (`prepare_run`: the HSIC run, the in-process baseline and the Ray Train one).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from hsic_ray.backprop import BackpropTrainer
from hsic_ray.config import ConfigError, ExperimentConfig, TrainConfig
from hsic_ray.data import ImageData, load_dataset
from hsic_ray.local_pipeline import LocalPipeline
from hsic_ray.machine import keep_freed_memory
from hsic_ray.models import LayerwiseNet, build_network, layer_step_costs
from hsic_ray.objective import HSICObjective
from hsic_ray.resources import check_disk, check_memory
from hsic_ray.run import tensorboard_log
from hsic_ray.run.start import CHECKPOINTS, CheckpointResume, Resumption, RunStart, plan_start
from hsic_ray.schedule import LRSchedule
from hsic_ray.stage_step import layer_lr_scales
from hsic_ray.timeline import Timeline
from hsic_ray.trainer import HSICTrainer, batches_between_drains

if TYPE_CHECKING:
    from hsic_ray.distributed.background_connect import BackgroundConnection

log = logging.getLogger("hsic_ray")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda, but torch sees no CUDA device here; use --device auto or cpu")
    return torch.device(name)


def build_seeded_network(cfg: ExperimentConfig, data: ImageData) -> LayerwiseNet:
    torch.manual_seed(cfg.train.seed)
    return build_network(cfg.model, data.input_shape)


def check_batch_fits(train: TrainConfig, data: ImageData) -> None:
    n = len(data.y_train)
    if n < train.batch_size:
        raise ConfigError(
            f"train.batch_size={train.batch_size} exceeds the {n} training samples of {data.name}; "
            "use a smaller --batch-size"
        )


def check_data_fits(cfg: ExperimentConfig, data: ImageData) -> None:
    """A full batch of `data` exists, the network and its kernels fit this machine's memory, and the output's
    disk has room for its checkpoints and results."""
    check_batch_fits(cfg.train, data)
    check_memory(cfg, data.input_shape)
    check_disk(cfg, data.input_shape)


@dataclass
class PreparedRun:
    """What a run has checked and built before its first file is written."""

    start: RunStart
    data: ImageData
    device: torch.device | None  # None: the run trains in Ray Train's workers, which choose their own
    net: LayerwiseNet | None  # None: likewise, the workers build it


def prepare_run(
    cfg: ExperimentConfig,
    method: str,
    resume: bool = False,
    data: ImageData | None = None,
    resumption: Resumption = CHECKPOINTS,
    in_process: bool = True,
) -> PreparedRun:
    """Claim the output directory and find what an interrupted run continues from (`plan_start`), load the
    data, check that it and the network fit, and, for a run that trains in this process, resolve its device
    and build its seeded network. Writes only the directory's lock, which the run holds until it ends (`with
    prepared.start:`; released here on any error): the run calls `start.commit` once its own checks pass.

    From here on this process trains or evaluates: it keeps the memory it frees for its next step
    (`keep_freed_memory`), as stage actors and Ray Train workers do."""
    keep_freed_memory()
    start = plan_start(cfg, method, resume, resumption)
    try:
        data = data or load_dataset(cfg.data)
        check_data_fits(cfg, data)
        if not in_process:
            return PreparedRun(start, data, None, None)
        return PreparedRun(start, data, resolve_device(cfg.train.device), build_seeded_network(cfg, data))
    except BaseException:
        start.release()
        raise


def _plan_ray_stages(
    cfg: ExperimentConfig, net: LayerwiseNet, checkpoint_stages: int | None, connection: BackgroundConnection | None
) -> list:
    """Connect to Ray (or wait for `connection`, started before the run) and lay the layers out as stages;
    raises before any actor starts if they won't fit.

    A resumed run keeps its checkpoint's stage count (each stage's file holds its own layers)."""
    from hsic_ray.distributed.connect import connect_for_stages
    from hsic_ray.distributed.placement import check_fits, cluster_totals, plan_stages

    ray_cfg = cfg.ray
    if checkpoint_stages is not None:
        if ray_cfg.stages not in (None, checkpoint_stages):
            raise ConfigError(
                f"ray.stages={ray_cfg.stages}, but the checkpoint to resume was written by {checkpoint_stages} "
                f"stages; resume with --stages {checkpoint_stages} (or without --stages)"
            )
        ray_cfg = dataclasses.replace(ray_cfg, stages=checkpoint_stages)
    if connection is None:
        connect_for_stages(ray_cfg)
    else:
        connection.wait()
    specs = plan_stages(
        ray_cfg, layer_step_costs(net, cfg.train.batch_size, cfg.hsic.max_kernel_features), cluster_totals()
    )
    check_fits(specs, ray_cfg.coordinator_cpus, ray_cfg.strategy)
    return specs


@contextlib.contextmanager
def _pipeline(cfg: ExperimentConfig, data: ImageData, net: LayerwiseNet, specs: list | None, device):
    schedule = LRSchedule.for_run(cfg.optim, cfg.train, len(data.y_train))
    if specs is None:
        layers = range(len(net.layers))
        objective = HSICObjective(cfg.hsic, data.num_classes, layers, len(layers))
        lr_scales = layer_lr_scales(cfg.hsic.lr_scale_last, layers, len(layers))
        yield LocalPipeline(net, objective, cfg.optim, device, cfg.train.cuda_graphs, lr_scales, schedule)
        return
    from hsic_ray.distributed.ray_pipeline import RayPipeline

    drain_every = functools.partial(batches_between_drains, cfg.train, len(data.y_train))
    pipeline = RayPipeline(cfg, specs, data.input_shape, data.num_classes, schedule, drain_every)
    try:
        yield pipeline
    finally:
        pipeline.shutdown()


def run_hsic(
    cfg: ExperimentConfig,
    data: ImageData | None = None,
    resume: bool = False,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    connection: BackgroundConnection | None = None,
) -> dict[str, Any]:
    """Train with the HSIC bottleneck (then the format head); returns and saves metrics.json.

    Everything that can fail cheaply (config, data, placement on the cluster, the output directory and its
    checkpoints) is checked before any actor starts. An interrupted run in the same output directory is
    continued from its latest checkpoint. A Ray run connects to Ray after those checks, or uses `connection`,
    started while the job imported torch (hsic_ray.launch).
    """
    timeline = Timeline()
    if cfg.train.tensorboard:
        tensorboard_log.require()  # before any file is written
    with timeline.phase("data"):
        prepared = prepare_run(cfg, "hsic", resume, data)
    with prepared.start as start:
        data, device, net, run = prepared.data, prepared.device, prepared.net, start.run
        resume_at = start.point or CheckpointResume()
        with timeline.phase("ray"):
            specs = _plan_ray_stages(cfg, net, resume_at.stages, connection) if cfg.trainer == "ray" else None
        start.commit(cfg)
        log.info(
            "run directory: %s  (%s, %d train / %d test samples, %s trainer)",
            run.uri,
            data.name,
            len(data.y_train),
            len(data.y_test),
            cfg.trainer,
        )
        with contextlib.ExitStack() as stack:
            with timeline.phase("actors"):  # the pipeline's stages, and the trainer's fixed batches
                pipeline = stack.enter_context(_pipeline(cfg, data, net, specs, device))
                trainer = HSICTrainer(cfg, data, pipeline, net.output_features, run, device, on_epoch, timeline)
            return trainer.fit(resume_at.step)


def run_backprop(
    cfg: ExperimentConfig,
    data: ImageData | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """The baseline: the same network and head trained end to end by backprop, in process."""
    prepared = prepare_run(cfg, "backprop", data=data)
    with prepared.start as start:
        start.commit(cfg)
        return BackpropTrainer(cfg, prepared.data, prepared.net, start.run, prepared.device).fit(on_epoch)

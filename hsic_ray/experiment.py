"""One run, end to end: check inputs, prepare the output directory, build the network, train, report.

Everything that can be checked cheaply (config, data, output directory) is checked before training starts.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import Any, Callable

import torch

from hsic_ray.backprop import BackpropTrainer
from hsic_ray import checkpoint, tensorboard_log
from hsic_ray.config import ConfigError, ExperimentConfig, config_from_yaml_text, save_config
from hsic_ray.data import ImageData, load_dataset
from hsic_ray.local import LocalPipeline
from hsic_ray.models import LayerwiseNet, build_network, layer_step_costs
from hsic_ray.objective import HSICObjective
from hsic_ray.run_dir import RunDirectory
from hsic_ray.trainer import HSICTrainer

log = logging.getLogger("hsic_ray")


class OutputExistsError(FileExistsError):
    """The output directory already holds a finished run, which a new run would overwrite."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda, but torch sees no CUDA device; use --device auto or cpu")
    return torch.device(name)


def default_output(cfg: ExperimentConfig, method: str) -> str:
    return f"runs/{cfg.preset or method}-{time.strftime('%Y%m%d-%H%M%S')}"


# Settings a resumed run must share with the run it continues (epochs, max_steps, logging may change).
_RESUME_MUST_MATCH = ("data", "model", "hsic", "optim", "head", "train.batch_size", "train.seed")


def _setting(cfg: ExperimentConfig, dotted: str) -> Any:
    value: Any = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def check_resumable(
    saved: ExperimentConfig, cfg: ExperimentConfig, uri: str, names: tuple[str, ...] = _RESUME_MUST_MATCH
) -> None:
    for name in names:
        if _setting(saved, name) != _setting(cfg, name):
            raise ConfigError(
                f"{uri} holds a run with different {name} settings ({_setting(saved, name)} there, "
                f"{_setting(cfg, name)} now); resume with the same settings or choose another --output"
            )


def unfinished_run_directory(cfg: ExperimentConfig, method: str) -> RunDirectory:
    """The run's output directory; a finished run (metrics.json) there is never written over."""
    run = RunDirectory(cfg.output or default_output(cfg, method))
    if run.exists("metrics.json"):
        raise OutputExistsError(f"{run.uri} already holds a finished run (metrics.json); choose another --output")
    return run


def open_run(cfg: ExperimentConfig, method: str, resume: bool = False) -> tuple[RunDirectory, int | None]:
    """The run directory, and the checkpoint step to resume from (None: a fresh run).

    A directory with a complete checkpoint and no metrics.json is an interrupted run: it is continued.
    A finished run is never written over. Checkpoint files are verified before anything is written.
    """
    run = unfinished_run_directory(cfg, method)
    step = checkpoint.latest_step(run)
    if step is None:
        if resume:
            raise checkpoint.CheckpointError(f"--resume: {run.uri} holds no complete checkpoint to resume from")
        run.write_text("config.yaml", save_config(cfg))
        return run, None
    check_resumable(config_from_yaml_text(run.read_text("config.yaml")), cfg, run.uri)
    checkpoint.verify(run, step)
    return run, step


def build_seeded_network(cfg: ExperimentConfig, data: ImageData) -> LayerwiseNet:
    torch.manual_seed(cfg.train.seed)
    return build_network(cfg.model, data.input_shape)


def check_batch_fits(cfg: ExperimentConfig, data: ImageData) -> None:
    n = len(data.y_train)
    if n < cfg.train.batch_size:
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} exceeds the {n} training samples of {data.name}; "
            "use a smaller --batch-size"
        )


def _plan_ray_stages(cfg: ExperimentConfig, net: LayerwiseNet) -> list:
    """Connect to Ray and lay the layers out as stages; raises before any actor starts if they won't fit."""
    from hsic_ray.distributed.connect import connect
    from hsic_ray.distributed.placement import check_fits, cluster_totals, plan_stages

    stages = cfg.ray.stages or os.cpu_count() or 1
    connect(cfg.ray.address, local_cpus=stages * cfg.ray.cpus_per_stage + cfg.ray.coordinator_cpus,
            ship_package=cfg.ray.ship_package)
    specs = plan_stages(cfg.ray, layer_step_costs(net, cfg.train.batch_size), cluster_totals())
    check_fits(specs, cfg.ray.coordinator_cpus, cfg.ray.strategy)
    return specs


@contextlib.contextmanager
def _pipeline(cfg: ExperimentConfig, data: ImageData, net: LayerwiseNet, specs: list | None, device):
    if specs is None:
        yield LocalPipeline(net, HSICObjective(cfg.hsic, data.num_classes), cfg.optim, device, cfg.train.cuda_graphs)
        return
    from hsic_ray.distributed.pipeline import RayPipeline

    # The coordinator computes each batch's targets while the stages train: keep it to its own CPUs so it
    # does not fight the stage actors for cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(cfg.ray.coordinator_cpus)))
    pipeline = RayPipeline(cfg, specs, data.input_shape, data.num_classes)
    try:
        yield pipeline
    finally:
        pipeline.shutdown()
        torch.set_num_threads(threads)


def run_hsic(
    cfg: ExperimentConfig,
    data: ImageData | None = None,
    resume: bool = False,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train with the HSIC bottleneck (then the format head); returns and saves metrics.json.

    Everything that can fail cheaply (config, data, placement on the cluster, the output directory and its
    checkpoints) is checked before any actor starts. An interrupted run in the same output directory is
    continued from its latest checkpoint.
    """
    if cfg.train.tensorboard:
        tensorboard_log.require()  # before any file is written
    data = data or load_dataset(cfg.data)
    check_batch_fits(cfg, data)
    device = resolve_device(cfg.train.device)
    net = build_seeded_network(cfg, data)
    specs = _plan_ray_stages(cfg, net) if cfg.trainer == "ray" else None
    run, resume_step = open_run(cfg, "hsic", resume)
    log.info("run directory: %s  (%s, %d train / %d test samples, %s trainer)",
             run.uri, data.name, len(data.y_train), len(data.y_test), cfg.trainer)  # fmt: skip
    with _pipeline(cfg, data, net, specs, device) as pipeline:
        trainer = HSICTrainer(cfg, data, pipeline, net.output_features, run, device, on_epoch)
        return trainer.fit(resume_step)


def run_backprop(
    cfg: ExperimentConfig,
    data: ImageData | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """The baseline: the same network and head trained end to end by backprop, in process."""
    data = data or load_dataset(cfg.data)
    check_batch_fits(cfg, data)
    device = resolve_device(cfg.train.device)
    run, _ = open_run(cfg, "backprop")
    return BackpropTrainer(cfg, data, build_seeded_network(cfg, data), run, device).fit(on_epoch)

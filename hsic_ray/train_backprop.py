"""The backprop baseline on Ray Train: the same network and format head trained end to end, data parallel.

`train_backprop` runs `ray.train.torch.TorchTrainer` with `num_workers` workers. Every worker builds the
network exactly as the in-process baseline does (`build_seeded_network`, then the head, from the same
seed), walks the same seeded batch order (`iterate_batches(seed, epoch)`) and takes its own rows of each
global batch by rank; gradients are averaged by DDP with each worker's loss weighted by its share of the
batch, so a step is the step of the whole batch's mean loss and a run takes as many steps as the
in-process baseline (`hsic_ray.backprop`, whose step, epoch loop and test accuracy it shares).

Each epoch, rank 0 measures test accuracy and the per-layer gradient norms (mean over the epoch's steps),
rewrites `metrics.jsonl` and reports the epoch to Ray Train with a checkpoint (model, optimizer, epoch,
batch position, step count, training time and the epoch records so far). Ray Train keeps the latest two
(`CheckpointConfig(num_to_keep=2)`) under `<output>/ray_train/backprop/`.

Resume (Ray 2.60, Train V2): `TorchTrainer.restore` / `can_restore` are deprecated and raise. Instead, a
trainer whose `RunConfig(storage_path, name)` points at an existing run loads that run's
`checkpoint_manager_snapshot.json` and hands its latest checkpoint to the workers through
`ray.train.get_checkpoint()`. So rerunning the same command on the same `--output` after an interruption
continues from the last epoch checkpointed: the training loop loads the model and optimizer state and
starts at the next batch, and the epochs and steps already done are not redone. The driver claims the output
and checks the interrupted run through the same `plan_start` as every run, with `RAY_TRAIN_CHECKPOINTS` to
find the newest Ray Train checkpoint that loads (an older one when the newest does not).

Writes, like the HSIC job: `config.yaml`, `metrics.jsonl` (one line per epoch, plus one per resume),
`metrics.json` (`test_accuracy_formatted`, `test_accuracy_unformatted: null`, `train_seconds`, `steps`,
`samples_per_second`, `epochs`, `grad_norms` per layer at the last epoch, plus `workers`, `resumed_from`),
and `grad_norms.png` (log10 of each layer's gradient norm by epoch).
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from hsic_ray import backprop, interrupt
from hsic_ray.config import (
    ConfigError,
    ExperimentConfig,
    TrainConfig,
    check_setting,
    config_from_yaml_text,
    save_config,
)
from hsic_ray.data import Batch, ImageData
from hsic_ray.distributed.connect import connect
from hsic_ray.distributed.placement import PlacementError, cluster_totals
from hsic_ray.distributed.stop_request import StopCheck, StopRequest
from hsic_ray.experiment import build_seeded_network, prepare_run
from hsic_ray.machine import keep_freed_memory, threads_for
from hsic_ray.run import checkpoint
from hsic_ray.run.checkpoint import CheckpointError
from hsic_ray.run.directory import RunDirectory
from hsic_ray.run.model_io import MODEL_FILE
from hsic_ray.run.start import Resumption
from hsic_ray.schedule import LRSchedule
from hsic_ray.stage_step import make_sgd

log = logging.getLogger("hsic_ray")

RAY_TRAIN_DIR = "ray_train"  # under the run's output directory: Ray Train's storage_path
RUN_NAME = "backprop"  # RunConfig(name): the experiment directory under storage_path
STATE_FILE = "state.pt"  # inside each checkpoint directory
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # what Ray Train V2 keeps per run (written after a checkpoint)
# A checkpoint directory's name; the attempt (one per start of the job on the output) keeps every attempt's
# checkpoints apart, so none is written over.
CHECKPOINT_NAME = re.compile(r"checkpoint_epoch(?P<epoch>\d+)_step(?P<step>\d+)_attempt(?P<attempt>\d+)")
PLOT_FILE = "grad_norms.png"
# Ray Train's preemption watcher, an actor that polls for draining nodes, serves training loops that ask
# ray.train.get_preemption_info and checkpoint just in time; this loop checkpoints every epoch and never asks
# (a preempted worker fails, and --max-failures retries from the latest checkpoint). Ray 2.60 logs an
# error-level line whenever it creates one (its constructor takes actor handles, and it restarts forever).
# Ray Train passes this variable from the driver to its controller and workers.
PREEMPTION_WATCHER = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"
# How often Ray Train's controller polls its workers (Ray's default: every 2 s). An epoch's report waits for
# the controller's next poll, so the default added up to 2 s to every epoch of a small run; polling a few
# workers ten times a second costs less than that wait (docs/results.md, "Ray Train's poll interval").
HEALTH_CHECK_INTERVAL = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
# Settings a resumed backprop run must share with the run it continues (epochs, max_steps, logging may change).
RESUME_MUST_MATCH = ("data", "model", "backprop", "train.batch_size", "train.seed")


# --- the training loop on each worker --------------------------------------------------------------------


def _shard_by_rank(rank: int, world: int, batch_size: int):
    """This worker's rows of each global batch, and the weight that makes DDP's average the batch mean."""
    if world == 1:
        return backprop.whole_batch

    def shard(batch: Batch) -> tuple[torch.Tensor, torch.Tensor, float]:
        x, y = torch.tensor_split(batch.x, world)[rank], torch.tensor_split(batch.y, world)[rank]
        return x, y, world * len(y) / batch_size

    return shard


def _checkpoint_steps(name: str) -> int:
    match = CHECKPOINT_NAME.fullmatch(name)
    return int(match["step"]) if match else -1


def _load_state(train_checkpoint, unreadable: tuple[str, ...] = (), resume_from: str | None = None):
    """The state to continue from: Ray Train's checkpoint (the latest of this `fit`, or of the snapshot it
    restored) unless it does not load or the one found on disk, `resume_from`, is newer; None: none."""
    name = os.path.basename(train_checkpoint.path.rstrip("/")) if train_checkpoint is not None else None
    newest = None if resume_from is None else os.path.basename(resume_from.rstrip("/"))
    if name is None or name in unreadable or (newest and _checkpoint_steps(newest) > _checkpoint_steps(name)):
        return None if resume_from is None else checkpoint.load_state(RunDirectory(resume_from), STATE_FILE)
    with train_checkpoint.as_directory() as directory:
        return torch.load(os.path.join(directory, STATE_FILE), map_location="cpu", weights_only=True)


def _write_history(run: RunDirectory, history: list[dict[str, Any]]) -> None:
    """metrics.jsonl, rewritten whole from the records the latest checkpoint holds."""
    run.write_text("metrics.jsonl", "".join(json.dumps(record) + "\n" for record in history))


def _setup_worker_logging() -> None:
    if not logging.getLogger().handlers and not log.handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")


def _quiet_report_lines() -> None:
    """Ray Train 2.60 logs each ray.train.report at INFO with its raw metrics, from a logger named after its
    module's file path: outside "ray.train", so RunConfig's LoggingConfig does not reach it."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray: its report lines, if any, stay
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


@dataclass
class _Progress:
    """Where a worker's training stands: the epoch and batch to run next, the steps and training time so far,
    and the records metrics.jsonl is rewritten from."""

    epoch: int = 1
    next_batch: int = 0
    steps: int = 0
    train_seconds: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def after(cls, state: dict[str, Any]) -> _Progress:
        """The progress that continues the checkpoint `state`, with the resume on record."""
        epoch, start = state["epoch"], state["next_batch"]
        if start >= state["total_batches"]:
            epoch, start = epoch + 1, 0
        history = [
            *state["history"],
            {"kind": "resume", "epoch": state["epoch"], "step": state["steps"], "next_batch": state["next_batch"]},
        ]
        return cls(epoch, start, state["steps"], state["train_seconds"], history)


def _build_model(cfg: ExperimentConfig, data: ImageData, state: dict[str, Any] | None, world: int, device):
    """The model (DDP-wrapped), its optimizer and its network, restored from `state` when resuming. Same seed,
    same builders as the in-process baseline: every rank builds identical weights."""
    import ray.train.torch

    model = backprop.build_model(build_seeded_network(cfg, data), data.num_classes)
    if state is not None:
        model.load_state_dict(state["model"])
    if world > 1 and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # batch statistics of the global batch
    model = ray.train.torch.prepare_model(model)
    optimizer = make_sgd(model.parameters(), cfg.backprop)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
    return model, optimizer, backprop.unwrap(model)[0]


def _report_checkpoint(
    model, optimizer, stats: backprop.EpochStats, progress: _Progress, record: dict[str, Any], attempt: int
):
    """Rank 0's report of an epoch (or of the steps before an interrupt), with the checkpoint to resume from."""
    import ray.train

    saved = {
        "model": backprop.unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": progress.epoch,
        "next_batch": stats.next_batch,
        "total_batches": stats.total,
        "steps": progress.steps,
        "train_seconds": progress.train_seconds,
        "history": progress.history,
    }
    with tempfile.TemporaryDirectory() as directory:
        torch.save(saved, os.path.join(directory, STATE_FILE))
        ray.train.report(
            {k: record[k] for k in ("epoch", "step", "loss", "test_accuracy", "grad_norms") if k in record},
            checkpoint=ray.train.Checkpoint.from_directory(directory),
            # The attempt in the name: no attempt writes into a directory of an earlier one (which it may not
            # have resumed from: an older one when the newest did not load, or none).
            checkpoint_dir_name=f"checkpoint_epoch{progress.epoch:05d}_step{progress.steps:09d}_attempt{attempt}",
        )


def _train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    cfg = config_from_yaml_text(config["config"])
    data = config["data"]
    data = ray.get(data) if isinstance(data, ray.ObjectRef) else data
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    interrupt.worker_exits_quietly()
    torch.set_num_threads(threads_for(config["cpus_per_worker"]))
    keep_freed_memory()
    _quiet_report_lines()
    if rank == 0:
        _setup_worker_logging()
    device = ray.train.torch.get_device()
    state = _load_state(ray.train.get_checkpoint(), tuple(config["unreadable"]), config["resume_from"])
    model, optimizer, net = _build_model(cfg, data, state, world, device)
    progress = _Progress() if state is None else _Progress.after(state)
    if state is not None and rank == 0:
        log.info(
            "resuming from the checkpoint of epoch %d (step %d): continuing at epoch %d, batch %d",
            state["epoch"],
            progress.steps,
            progress.epoch,
            progress.next_batch,
        )
    worker = _Worker(
        RunDirectory(config["run"]) if rank == 0 else None,
        rank,
        world,
        device,
        StopCheck(config["stop_flag"], rank, world, device),
        config["attempt"],
    )
    _train_epochs(cfg, data, model, optimizer, net, progress, worker)


@dataclass
class _Worker:
    """Where a worker runs: rank 0 writes `run` and the checkpoints; every rank asks `stop` before a step."""

    run: RunDirectory | None
    rank: int
    world: int
    device: torch.device
    stop: StopCheck
    attempt: int


def _train_epochs(cfg, data, model, optimizer, net, progress: _Progress, worker: _Worker) -> None:
    """Every epoch left; rank 0 measures, records and checkpoints each one, the other ranks report progress.
    Asked to stop, the workers stop before the next step and rank 0 checkpoints the steps since the last."""
    import ray.train

    train, rank, world, device = cfg.train, worker.rank, worker.world, worker.device
    shard = _shard_by_rank(rank, world, train.batch_size)
    schedule = LRSchedule.for_run(cfg.backprop, train, len(data.y_train))
    while progress.epoch <= train.epochs and (train.max_steps is None or progress.steps < train.max_steps):
        start = progress.steps
        stats = backprop.train_epoch(
            model,
            optimizer,
            net,
            data,
            train,
            progress.epoch,
            progress.steps,
            device,
            start=progress.next_batch,
            shard=shard,
            verbose=rank == 0,
            schedule=schedule,
            stop=worker.stop,
        )
        progress.steps, progress.train_seconds = stats.steps, progress.train_seconds + stats.seconds
        if stats.stopped:
            _report_interrupt(model, optimizer, stats, progress, worker, trained=stats.steps > start)
            return
        if rank != 0:
            ray.train.report({"epoch": progress.epoch, "step": progress.steps}, checkpoint=None)
        else:
            record = backprop.epoch_record(stats, backprop.test_accuracy(backprop.unwrap(model), data, device))
            record.update(train_seconds=progress.train_seconds, workers=world)
            progress.history.append(record)
            log.info(
                "backprop epoch %d: loss %.4f, test accuracy %.2f%% (%d steps)",
                progress.epoch,
                record["loss"],
                record["test_accuracy"],
                progress.steps,
            )
            _report_checkpoint(model, optimizer, stats, progress, record, worker.attempt)
            _write_history(worker.run, progress.history)  # after the checkpoint is stored: never ahead of it
        progress.next_batch = 0
        if stats.complete:
            progress.epoch += 1


def _report_interrupt(model, optimizer, stats, progress: _Progress, worker: _Worker, trained: bool) -> None:
    """The driver asked the workers to stop before the next step: rank 0 checkpoints the steps since the
    last checkpoint (mid-epoch: the resumed run takes the epoch's remaining batches), unless there are none."""
    import ray.train

    if worker.rank != 0 or not trained:
        ray.train.report({"epoch": progress.epoch, "step": progress.steps}, checkpoint=None)
        return
    record = {"kind": "interrupt", "epoch": progress.epoch, "step": progress.steps, "next_batch": stats.next_batch}
    progress.history.append(record)
    log.info("stopping at step %d (epoch %d, batch %d): checkpointing", progress.steps, stats.epoch, stats.next_batch)
    _report_checkpoint(model, optimizer, stats, progress, record, worker.attempt)
    _write_history(worker.run, progress.history)


# --- the driver ------------------------------------------------------------------------------------------


@dataclass
class _RayTrainResume:
    """The Ray Train checkpoint an interrupted run continues from: the newest on disk whose state loads,
    whether or not Ray Train's snapshot (written after the checkpoint) lists it. Workers load it unless Ray
    Train hands them a newer one (a retry within the same `fit`)."""

    location: str | None = None  # the checkpoint directory; None: the run starts from its beginning
    attempt: int = 0  # this attempt's number: one more than any attempt's checkpoint on disk
    unreadable: dict[str, str] = field(default_factory=dict)  # checkpoint dir name -> why it does not load

    @property
    def found(self) -> bool:
        return self.location is not None

    def commit(self, run: RunDirectory) -> None:
        if self.found:
            log.info("continuing the interrupted run in %s from %s", run.uri, self.location)
        for name, why in self.unreadable.items():
            kept = _set_aside(run, name)
            log.warning(
                "Ray Train checkpoint %s cannot be loaded (%s); kept as %s, continuing from %s",
                name,
                why,
                run.path(kept),
                self.location,
            )


def _set_aside(run: RunDirectory, name: str) -> str:
    """A copy of checkpoint `name` that nothing loads or deletes; returns its name in the run. A copy, not a
    move: Ray Train's own bookkeeping may list the original, which its rotation deletes in time."""
    source, kept = f"{RAY_TRAIN_DIR}/{RUN_NAME}/{name}", f"{RAY_TRAIN_DIR}/unreadable-{name}"
    for file in run.list_dir(source):
        run.write_bytes(f"{kept}/{file}", run.read_bytes(f"{source}/{file}"))
    return kept


def _find_ray_train_checkpoint(run: RunDirectory) -> _RayTrainResume:
    """Load the run's Ray Train checkpoints newest first, before any worker starts (a corrupt one would
    otherwise fail every worker, and again on every rerun)."""
    experiment = f"{RAY_TRAIN_DIR}/{RUN_NAME}"
    found = {m: m["step"] for m in map(CHECKPOINT_NAME.fullmatch, run.list_dir(experiment)) if m}
    newest_first = sorted(found, key=lambda m: (int(m["step"]), int(m["attempt"])), reverse=True)
    point = _RayTrainResume(attempt=1 + max((int(m["attempt"]) for m in found), default=-1))
    for match in newest_first:
        name = match.group(0)
        try:
            checkpoint.load_state(run, f"{experiment}/{name}/{STATE_FILE}")
        except CheckpointError as exc:
            point.unreadable[name] = str(exc)
            continue
        point.location = f"{run.location.rstrip('/')}/{experiment}/{name}"
        return point
    if point.unreadable:
        raise CheckpointError(
            f"no Ray Train checkpoint in {run.path(experiment)} can be loaded "
            f"({'; '.join(point.unreadable.values())}); start a new run with another --output"
        )
    return point


# How a Ray Train run continues: from its checkpoints on disk, through the same claim and start as every run.
RAY_TRAIN_CHECKPOINTS = Resumption(RESUME_MUST_MATCH, _find_ray_train_checkpoint, "Ray Train checkpoint")


def _check_resources(workers: int, use_gpu: bool, cpus_per_worker: float) -> None:
    totals = cluster_totals()
    need = {"CPU": workers * cpus_per_worker, "GPU": float(workers) if use_gpu else 0.0}
    for kind, amount in need.items():
        if amount > totals[kind]:
            raise PlacementError(
                f"{workers} Ray Train workers need {amount:g} {kind} but the cluster has {totals[kind]:g}; "
                f"use fewer --workers{' or drop --use-gpu' if kind == 'GPU' else ''}, or a larger cluster"
            )


def training_failure(exc: Exception) -> str:
    """One line for a Ray Train failure (its message holds every worker's traceback): the cause and the fix."""
    text = str(exc)
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)
    if "OutOfMemoryError" in text or "memory" in text.lower():
        return f"Ray Train's workers ran out of memory ({first}); use fewer --workers or a smaller network"
    return (
        f"training failed ({first}); its checkpoints are kept: rerun the same command to continue from the "
        "latest one (--max-failures N lets Ray Train retry by itself)"
    )


def _check_worker_settings(train: TrainConfig, workers: int, cpus_per_worker: float, max_failures: int) -> None:
    check_setting(workers >= 1, "workers", workers, "a number >= 1")
    check_setting(max_failures >= 0, "max_failures", max_failures, "a number >= 0")
    check_setting(cpus_per_worker > 0, "cpus_per_worker", cpus_per_worker, "a positive number")
    if train.batch_size < 2 * workers:
        raise ConfigError(
            f"train.batch_size={train.batch_size} is invalid for {workers} workers: each worker's share of a "
            f"batch needs at least 2 samples (BatchNorm), so use --batch-size >= {2 * workers} or fewer --workers"
        )


def _write_results(
    cfg: ExperimentConfig, data: ImageData, run: RunDirectory, state: dict[str, Any], workers: int, checkpoint_path: str
) -> dict[str, Any]:
    """metrics.jsonl, the gradient-norm plot, model.pt and metrics.json (last: it marks the run finished)
    from the final Ray Train checkpoint's state; returns the metrics."""
    history = state["history"]
    records = [r for r in history if r["kind"] == "epoch"]
    _write_history(run, history)
    metrics = backprop.final_metrics(records[-1], state["train_seconds"], state["steps"], cfg.train.batch_size)
    metrics.update(
        workers=workers,
        resumed_from=[{"epoch": r["epoch"], "step": r["step"]} for r in history if r["kind"] == "resume"],
        checkpoint=checkpoint_path,
    )
    _plot_grad_norms(run, records, f"backprop, {cfg.preset or cfg.model.arch}: {len(metrics['grad_norms'])} layers")
    run.write_bytes(MODEL_FILE, backprop.model_file(cfg, data, state["model"]))
    run.write_json("metrics.json", metrics)
    return metrics


def _plot_grad_norms(run: RunDirectory, records: list[dict[str, Any]], title: str) -> None:
    # Imported here: every Ray Train worker imports this module, and only the driver draws.
    from hsic_ray.run.plots import plot_curves

    layers = len(records[-1]["grad_norms"])
    series = {
        f"layer {i + 1}": [(r["epoch"], torch.tensor(max(r["grad_norms"][i], 1e-30)).log10().item()) for r in records]
        for i in range(layers)
    }
    run.write_with_local_file(
        PLOT_FILE,
        lambda path: plot_curves(series, path, "epoch", "log10 gradient norm (mean over the epoch's steps)", title),
    )


def _torch_trainer(run: RunDirectory, cfg: ExperimentConfig, data: ImageData, point, layout: dict[str, Any], stop_flag):
    """Ray Train's trainer of the run: its workers, their training loop and where it keeps checkpoints."""
    import ray.train
    from ray.train.torch import TorchTrainer

    workers, use_gpu, cpus_per_worker = layout["workers"], layout["use_gpu"], layout["cpus_per_worker"]
    resources = {"CPU": cpus_per_worker, **({"GPU": 1.0} if use_gpu else {})}
    # Read by Ray Train as its controller starts; a user's own values win.
    os.environ.setdefault(PREEMPTION_WATCHER, "0")
    os.environ.setdefault(HEALTH_CHECK_INTERVAL, "0.1")
    return TorchTrainer(
        _train_loop_per_worker,
        train_loop_config={
            "config": save_config(cfg),
            "data": ray.put(data),
            "run": run.location,
            "cpus_per_worker": cpus_per_worker,
            "unreadable": list(point.unreadable) if point else [],
            "resume_from": point.location if point else None,
            "attempt": point.attempt if point else 0,
            "stop_flag": stop_flag,
        },
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            storage_path=_storage_path(run),
            name=RUN_NAME,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            failure_config=ray.train.FailureConfig(max_failures=layout["max_failures"]),
            # Ray Train's console lines: errors only. Its INFO lines repeat each report's raw metrics, and its
            # warnings include transient ones with a traceback (a resource request to its autoscaling
            # coordinator timing out on a busy machine); its log files in Ray's session directory keep all.
            logging_config=ray.train.LoggingConfig(log_level="ERROR"),
        ),
    )


def _storage_path(run: RunDirectory) -> str:
    return f"{run.location.rstrip('/')}/{RAY_TRAIN_DIR}"


def train_backprop(
    cfg: ExperimentConfig,
    data: ImageData | None = None,
    resume: bool = False,
    workers: int = 1,
    use_gpu: bool = False,
    cpus_per_worker: float = 1.0,
    max_failures: int = 0,
) -> dict[str, Any]:
    """Train the network and head end to end by backprop on Ray Train; returns and saves metrics.json.

    Config, data, the output directory and the cluster's resources are checked before any worker starts.
    An interrupted run in the same output directory (Ray Train checkpoints, no metrics.json) is continued
    from its latest checkpoint; `resume=True` insists on one. `max_failures` worker-group failures are
    retried by Ray Train from the latest checkpoint within this call.
    """
    _check_worker_settings(cfg.train, workers, cpus_per_worker, max_failures)
    prepared = prepare_run(cfg, "backprop", resume, data, RAY_TRAIN_CHECKPOINTS, in_process=False)
    with prepared.start as start:  # the output's lock, held until the run ends
        connect(
            cfg.ray.address,
            local_cpus=workers * cpus_per_worker,
            processes=workers + 1,
            cpus_per_process=cpus_per_worker,
            ship_package=cfg.ray.ship_package,
            state_api=True,
        )
        _check_resources(workers, use_gpu, cpus_per_worker)
        start.commit(cfg)
        run, data = start.run, prepared.data
        _log_start(run, data, workers, use_gpu)
        layout = {
            "workers": workers,
            "use_gpu": use_gpu,
            "cpus_per_worker": cpus_per_worker,
            "max_failures": max_failures,
        }
        result = _fit(run, cfg, data, start.point, layout)
        # No checkpoint of this attempt: it continued a run whose last checkpoint was its end.
        final = result.checkpoint.path if result.checkpoint else start.point and start.point.location
        if final is None:
            raise CheckpointError(f"Ray Train finished without a checkpoint in {_storage_path(run)}/{RUN_NAME}")
        state = _load_state(result.checkpoint, resume_from=final)
        metrics = _write_results(cfg, data, run, state, workers, final)
    log.info(
        "backprop done: test accuracy %.2f%% after %d epochs, %d steps, %.1f s of training",
        metrics["test_accuracy_formatted"],
        metrics["epochs"],
        metrics["steps"],
        metrics["train_seconds"],
    )
    return metrics


def _log_start(run: RunDirectory, data: ImageData, workers: int, use_gpu: bool) -> None:
    log.info(
        "run directory: %s  (%s, %d train / %d test samples, %d Ray Train worker%s%s; checkpoints in %s/%s)",
        run.uri,
        data.name,
        len(data.y_train),
        len(data.y_test),
        workers,
        "s" if workers > 1 else "",
        " on GPUs" if use_gpu else "",
        _storage_path(run),
        RUN_NAME,
    )


def _fit(run: RunDirectory, cfg: ExperimentConfig, data: ImageData, point, layout: dict[str, Any]):
    """Ray Train's `fit`; SIGINT or SIGTERM stops its workers before their next step, after a checkpoint
    (hsic_ray.distributed.stop_request), and ends the run with Interrupted at the checkpoint's step."""
    with interrupt.at_safe_points(), StopRequest() as stop:
        result = _torch_trainer(run, cfg, data, point, layout, stop.flag).fit()
        if interrupt.requested():
            interrupt.stop(None if result.checkpoint is None else _load_state(result.checkpoint)["steps"])
    return result

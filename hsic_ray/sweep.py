"""Ray Tune sweeps over depth (and other settings), comparing HSIC training with backprop.

Each trial is one run of `run_hsic` (the Ray pipeline, its stage actors inside the trial's placement
group, declared up front so trials never wait on each other for actors) or of the in-process backprop
baseline, on the same network, data and budget. Trials report once per epoch with `tune.report`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler

from hsic_ray import interrupt
from hsic_ray.config import ExperimentConfig, build_config
from hsic_ray.data import ImageData, load_dataset
from hsic_ray.distributed.connect import connect
from hsic_ray.distributed.placement import PlacementError, StageSpec, bundles, cluster_totals
from hsic_ray.errors import Interrupted
from hsic_ray.experiment import check_data_fits, run_backprop, run_hsic
from hsic_ray.run import claim as run_claim
from hsic_ray.run.claim import OutputExistsError
from hsic_ray.run.directory import RunDirectory
from hsic_ray.run.model_io import MODEL_FILE
from hsic_ray.sweep_progress import SweepProgress
from hsic_ray.sweep_results import row_order, write_results
from hsic_ray.sweep_spec import SweepSpec, with_absolute_data_paths

log = logging.getLogger("hsic_ray")

# What ASHA and the Tuner rank trials by: test accuracy of a linear readout of the network's output. Per
# epoch, HSIC trials fit one in closed form (their format head trains only at the end); backprop trials
# train theirs with the network. Final reports give the trained format head's accuracy.
# One key for both, on purpose: ASHA needs the metric in every epoch's report and compares trials at the same
# epoch, where every trial's value is a per-epoch readout; the Tuner's best result and results.md take each
# trial's last report, the final one. The one place the two could meet, a "best trial" while trials still
# run, is the progress table's, which ranks final reports only (sweep_progress.best_finished).
METRIC = "test_accuracy_formatted"
PROGRESS_EVERY_S = 30.0  # the least time between two progress tables
CHECKPOINT_FILES = (MODEL_FILE, "config.yaml", "metrics.json")  # what a trial's Tune checkpoint holds
NEW_OUTPUT = "RAY_AIR_NEW_OUTPUT"  # Tune's switch between its output engines ("0": the legacy one)
DISABLE_TUNE_SIGINT = "TUNE_DISABLE_SIGINT_HANDLER"  # "1": Tune leaves SIGINT to the job (see _signals_stop_tune)


# --- trials (run inside Ray Tune workers) ----------------------------------------------------------------


def trial_config(params: dict[str, Any]) -> ExperimentConfig:
    """The run config of one trial from its Tune parameters (validated like any run's)."""
    overrides = dict(params["overrides"])
    overrides["model.depth"] = params["depth"]
    overrides.update({k: v for k, v in params.items() if "." in k})  # grid keys and per-trial ray layout
    trial = f"{params['method']}-{tune.get_context().get_trial_id()}"
    overrides["output"] = f"{params['sweep_dir']}/{run_claim.SWEEP_TRIALS}/{trial}"
    return build_config(params["preset"], overrides=overrides)


def _report(
    metrics: dict[str, Any],
    formatted: float | None,
    unformatted: float | None,
    readout: str,
    run_dir: str | None = None,
) -> None:
    """One Tune report. Every report of either method carries both accuracy keys (None where a method has
    none), so METRIC means the same thing, a linear readout's accuracy, in every trial at every epoch;
    `readout` says which. The final report hands Tune the run's model.pt as the trial's checkpoint."""
    metrics = {**metrics, METRIC: formatted, "test_accuracy_unformatted": unformatted, "readout": readout}
    if run_dir is None:
        tune.report(metrics)
        return
    run = RunDirectory(run_dir)
    with tempfile.TemporaryDirectory() as directory:  # Tune copies it into the trial's storage
        for name in CHECKPOINT_FILES:
            with open(os.path.join(directory, name), "wb") as f:
                f.write(run.read_bytes(name))
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(directory))


def hsic_trial(params: dict[str, Any]) -> None:
    cfg = trial_config(params)
    cfg.trainer = "ray"

    def report(epoch: dict[str, Any]) -> None:
        _report(
            {"epoch": epoch["epoch"], "train_seconds": epoch["train_seconds"], "final": False},
            epoch["test_accuracy_least_squares"],
            epoch["test_accuracy_unformatted"],
            "least_squares",
        )

    metrics = run_hsic(cfg, on_epoch=report)
    _report(
        {"epoch": metrics["epochs"], "train_seconds": metrics["train_seconds"], "final": True},
        metrics["test_accuracy_formatted"],
        metrics["test_accuracy_unformatted"],
        "format_head",
        cfg.output,
    )


def backprop_trial(params: dict[str, Any]) -> None:
    cfg = trial_config(params)

    def report(epoch: dict[str, Any]) -> None:
        _report(
            {
                "epoch": epoch["epoch"],
                "train_seconds": epoch["train_seconds"],
                "final": False,
                "grad_norms": epoch["grad_norms"],
            },
            epoch["test_accuracy"],
            None,
            "format_head",
        )

    metrics = run_backprop(cfg, on_epoch=report)
    _report(
        {
            "epoch": metrics["epochs"],
            "train_seconds": metrics["train_seconds"],
            "final": True,
            "grad_norms": metrics["grad_norms"],
        },
        metrics["test_accuracy_formatted"],
        None,
        "format_head",
        cfg.output,
    )


def run_trial(params: dict[str, Any]) -> None:
    interrupt.worker_exits_quietly()
    # Tune logs each stored checkpoint's path at INFO from the trial's process; the progress table says enough.
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    (hsic_trial if params["method"] == "hsic" else backprop_trial)(params)


def trial_resources(spec: SweepSpec):
    """Each trial's placement group, declared up front: the coordinator's bundle, then one per stage."""
    stages = [StageSpec(i, i, i + 1, 1.0, spec.gpus_per_stage) for i in range(spec.stages_per_trial)]
    hsic = tune.PlacementGroupFactory(bundles(stages, 1.0), strategy="PACK")
    backprop = tune.PlacementGroupFactory([{"CPU": 1.0}])
    return lambda params: hsic if params["method"] == "hsic" else backprop


# --- the sweep (run on the driver) -----------------------------------------------------------------------


def _validate_trials(spec: SweepSpec) -> None:
    """Build and check every trial before Ray starts, data included, so a bad setting fails in seconds
    instead of in every trial."""
    configs = spec.check()
    datasets: dict[str, ImageData] = {}
    for cfg in configs:
        key = f"{cfg.data.source} {cfg.data.root} {cfg.data.test_fraction} {cfg.data.split_seed}"
        if key not in datasets:
            datasets[key] = load_dataset(cfg.data)
        check_data_fits(cfg, datasets[key])


def _check_capacity(spec: SweepSpec) -> None:
    need = {"CPU": 1.0 + spec.stages_per_trial, "GPU": spec.gpus_per_stage * spec.stages_per_trial}
    have = cluster_totals()
    if any(need[k] > have[k] for k in need):
        raise PlacementError(
            f"one HSIC trial needs {need['CPU']:g} CPU and {need['GPU']:g} GPU (coordinator + {spec.stages_per_trial} "
            f"stages), the cluster has {have['CPU']:g} CPU and {have['GPU']:g} GPU; lower --stages-per-trial or "
            "--gpus-per-stage, or add nodes"
        )


def _param_space(spec: SweepSpec, sweep_dir: str) -> dict[str, Any]:
    space: dict[str, Any] = {
        "preset": spec.preset,
        "overrides": {key: with_absolute_data_paths(key, value) for key, value in spec.overrides.items()},
        "sweep_dir": sweep_dir,
        "depth": tune.grid_search(spec.depths),
        "method": tune.grid_search(spec.methods),
        "ray.stages": spec.stages_per_trial,
        "ray.gpus_per_stage": spec.gpus_per_stage,
    }
    space.update(
        {key: tune.grid_search([with_absolute_data_paths(key, v) for v in values]) for key, values in spec.grid.items()}
    )
    return space


def run_sweep(spec: SweepSpec, resume: bool = False, address: str | None = None) -> list[dict[str, Any]]:
    """Run (or resume) the sweep; write results.csv, results.md and accuracy_vs_depth.png; return the rows
    (by method and grid settings, then depth). Holds the output's lock (hsic_ray.run.lock) until it ends."""
    with run_claim.take(spec.output, "sweep", resume) as claim:
        return _run_claimed(claim, spec, resume, address)


def _run_claimed(claim: run_claim.Claim, spec: SweepSpec, resume: bool, address: str | None) -> list[dict[str, Any]]:
    if claim.interrupted and not resume and claim.run.exists("tune"):
        raise OutputExistsError(
            f"{claim.run.uri} holds an interrupted sweep; add --resume to continue it, or choose another --output"
        )
    _validate_trials(spec)
    processes = (1 + spec.stages_per_trial) * spec.max_concurrent_trials
    ship_package = build_config(spec.preset, overrides=spec.overrides).ray.ship_package
    connect(address, local_cpus=processes, processes=processes, ship_package=ship_package)
    _check_capacity(spec)
    sweep_dir = claim.run.location
    trainable = tune.with_resources(run_trial, trial_resources(spec))
    tune_path = f"{sweep_dir}/tune"
    if resume:
        if not tune.Tuner.can_restore(tune_path):
            raise FileNotFoundError(f"--resume: no sweep to restore at {tune_path}")
        tuner = tune.Tuner.restore(tune_path, trainable, resume_errored=True)
    else:
        claim.commit()
        scheduler = ASHAScheduler(time_attr="epoch", grace_period=1) if spec.asha else None
        tuner = tune.Tuner(
            trainable,
            param_space=_param_space(spec, sweep_dir),
            tune_config=tune.TuneConfig(
                metric=METRIC, mode="max", scheduler=scheduler, max_concurrent_trials=spec.max_concurrent_trials
            ),
            run_config=tune.RunConfig(
                storage_path=sweep_dir,
                name="tune",
                verbose=0,  # our own progress table instead of Tune's
                callbacks=[SweepProgress(METRIC, list(spec.grid), PROGRESS_EVERY_S)],
            ),
        )
    _log_where_results_go(claim.run)
    started = time.perf_counter()
    with _tune_output_quiet(), _signals_stop_tune() as received:
        grid = tuner.fit()
    if received:  # Tune stopped the trials and saved the sweep's state; its grid is partial
        # Disconnected first: Ray forwards the stopped trials' last lines for a while, and they must not come
        # after the job's own last line.
        ray.shutdown()
        raise Interrupted(received[0], how="add --resume to the same command to continue")
    rows = sorted((_row(result) for result in grid), key=row_order)
    write_results(claim.run, rows)
    log.info("sweep finished in %.0fs", time.perf_counter() - started)
    return rows


@contextlib.contextmanager
def _signals_stop_tune() -> Iterator[list[int]]:
    """While Tune runs: SIGINT or SIGTERM stops it as Tune's own Ctrl-C handler would (trials stopped, the
    sweep's state saved for --resume), by sending the SIGUSR1 that Tune always handles that way, and is added
    to the list yielded, so that the job can say it was interrupted. A second signal ends the job at once, with
    its one line (os._exit: an exception raised in a handler while Ray waits in C code surfaces as a
    SystemError). Tune's own SIGINT handler is kept out (TUNE_DISABLE_SIGINT_HANDLER): it would leave no trace
    of the interruption but a partial grid; its warnings about the stop name Tuner.restore, not --resume, and
    are silenced."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGUSR1"):
        yield received
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    tune_log = logging.getLogger("ray.tune")
    tune_level = tune_log.level

    def stop_tune(signum: int, frame) -> None:
        if received:
            print(Interrupted(signum), file=sys.stderr, flush=True)
            os._exit(128 + signum)
        received.append(signum)
        tune_log.setLevel(logging.ERROR)
        os.kill(os.getpid(), signal.SIGUSR1)

    saved = os.environ.get(DISABLE_TUNE_SIGINT)
    os.environ[DISABLE_TUNE_SIGINT] = "1"
    for signum in previous:
        signal.signal(signum, stop_tune)
    try:
        yield received
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        tune_log.setLevel(tune_level)
        if saved is None:
            os.environ.pop(DISABLE_TUNE_SIGINT, None)
        else:
            os.environ[DISABLE_TUNE_SIGINT] = saved


@contextlib.contextmanager
def _tune_output_quiet():
    """Tune's legacy output engine while the sweep runs, which prints nothing at verbose=0. Its default engine
    prints a table of the experiment and a TensorBoard hint pointing at its staging directory in Ray's
    temporary directory even then. A RAY_AIR_NEW_OUTPUT the user set is left as it is."""
    if NEW_OUTPUT in os.environ:
        yield
        return
    os.environ[NEW_OUTPUT] = "0"
    try:
        yield
    finally:
        os.environ.pop(NEW_OUTPUT, None)


def _log_where_results_go(run: RunDirectory) -> None:
    """Where Tune keeps each trial's records, and the TensorBoard command for them (Tune writes event files
    there when tensorboardX is installed)."""
    tune_dir = run.local_path("tune") or f"{run.location.rstrip('/')}/tune"
    log.info("each trial's results: %s", tune_dir)
    if importlib.util.find_spec("tensorboardX") is not None:
        log.info("TensorBoard: tensorboard --logdir %s", tune_dir)


def _row(result) -> dict[str, Any]:
    cfg, metrics = result.config, result.metrics or {}
    return {
        "depth": cfg["depth"],
        "method": cfg["method"],
        **{k: cfg[k] for k in cfg if "." in k and k not in ("ray.stages", "ray.gpus_per_stage")},
        "test_accuracy": metrics.get(METRIC),  # the format head's, once the trial finished
        "test_accuracy_unformatted": metrics.get("test_accuracy_unformatted"),
        "epochs": metrics.get("epoch"),
        "train_seconds": metrics.get("train_seconds"),
        "finished": bool(metrics.get("final")),
        "error": None if result.error is None else type(result.error).__name__,
    }

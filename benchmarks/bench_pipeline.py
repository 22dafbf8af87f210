"""Throughput of the Ray pipeline against the in-process trainer, on the same config and machine.

    python benchmarks/bench_pipeline.py                       # 2, 4, 8 stages, width 1024, 8 layers
    python benchmarks/bench_pipeline.py --stages 2 --steps 60 --width 256
    python benchmarks/bench_pipeline.py --long 600            # object-store use over a long run
    python benchmarks/bench_pipeline.py --stages 2 4 8 16 --threads-per-stage   # stages x threads = cores
    python benchmarks/bench_pipeline.py --device cuda --factors-on coordinator first_stage
    python benchmarks/bench_pipeline.py --json run.json --plot run.png   # figures kept, samples/s drawn

Prints samples/s of each against the in-process trainer at its best thread count on this machine, the
pipeline efficiency (measured throughput over 1 / slowest stage's busy time per batch), where a batch's
time goes (the coordinator's factors, submission and waiting; the slowest stage's compute, transfers and
idle time), the actor-to-actor hop cost of one batch of activations for each way of sending it, and the
object store's use sampled through the run (it must stay flat: in-flight batches are bounded).
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import os
import platform
import re
import time

import numpy as np
import ray
import torch
from ray._private.internal_api import memory_summary

from hsic_ray.config import FACTORS_ON, build_config
from hsic_ray.data import iterate_batches, load_dataset
from hsic_ray.distributed.placement import plan_stages
from hsic_ray.distributed.ray_pipeline import RayPipeline
from hsic_ray.experiment import build_seeded_network
from hsic_ray.local_pipeline import LocalPipeline
from hsic_ray.machine import keep_freed_memory
from hsic_ray.models import layer_step_costs
from hsic_ray.objective import HSICObjective, factor_group_size
from hsic_ray.run.plots import plot_curves
from hsic_ray.trainer import loop_factor_group, with_factors


def object_store_mib() -> float:
    match = re.search(r"Plasma memory usage (\d+) MiB", memory_summary(stats_only=True))
    return float(match.group(1)) if match else float("nan")


def _factor_group(text: str) -> int | None:
    if text == "auto":
        return None
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number >= 1 or auto")
    return int(text)


def batches(data, batch_size):
    """Training batches, epoch after epoch, without end."""
    for epoch in itertools.count(1):
        yield from iterate_batches(data.x_train, data.y_train, batch_size, seed=0, epoch=epoch)


class _Stopwatch:
    """Seconds spent per named part of the loop."""

    def __init__(self):
        self.seconds = collections.Counter()

    def timed(self, part, fn):
        def run(*args):
            started = time.perf_counter()
            try:
                return fn(*args)
            finally:
                self.seconds[part] += time.perf_counter() - started

        return run


def drive(pipeline, objective, data, batch_size, steps, warmup, sample_memory_every=0, factor_group=None):
    """The trainer's loop without its logging: factors computed as the trainer does (`with_factors`),
    submission with bounded in-flight batches, results collected in order; timed part by part.

    The clock runs over `steps` batches in the pipeline's steady state. It starts once the pipeline has
    settled how many batches go in a call (`RayPipeline.settled`) and a full in-flight window of batches
    sent since, and `warmup` more, have come out: a pipeline's fill, its first group crossing every stage
    (a third of the time over a few dozen batches at 16 stages, and again when the group size changes),
    is paid once by a training run's thousands of batches."""
    watch = _Stopwatch()
    group = loop_factor_group(pipeline, factor_group, batch_size)
    items = with_factors(
        batches(data, batch_size), watch.timed("factors", objective.group_kernel_factors), pipeline, group
    )
    next_item = watch.timed("waiting for factors", lambda: next(items))
    submit = watch.timed("submit", pipeline.submit)
    result = watch.timed("waiting for results", lambda h: pipeline.result(h, want_output=False, read_back=False))
    pending, memory, timed, started = collections.deque(), [], 0, None
    submitted, last_untimed = 0, None  # the last batch before the clock, once known
    stage = np.zeros((pipeline.num_stages, 4))  # per stage: seconds busy, idle, transferring, computing factors

    def finish():
        nonlocal timed, started
        j, handle = pending.popleft()
        step = result(handle)
        if j == last_untimed:
            started, watch.seconds = time.perf_counter(), collections.Counter()
        if last_untimed is None or j <= last_untimed:
            return
        timed += 1
        if step.stage_seconds:  # the in-process trainer reports none
            stage[:, :2] += step.stage_seconds
            stage[:, 2] += step.stage_transfer_seconds
            stage[:, 3] += step.stage_factor_seconds

    while last_untimed is None or submitted <= last_untimed + steps:
        if last_untimed is None and getattr(pipeline, "settled", True):
            last_untimed = submitted + pipeline.max_in_flight + warmup - 1
        pending.append((submitted, submit(*next_item())))
        submitted += 1
        while len(pending) >= pipeline.max_in_flight:
            finish()
        if sample_memory_every and submitted % sample_memory_every == 0:
            memory.append((submitted, object_store_mib()))
    while pending:
        finish()
    seconds = time.perf_counter() - started
    getattr(items, "close", lambda: None)()  # stops with_factors' prefetching thread
    stage /= timed
    return {
        "samples_per_second": timed * batch_size / seconds,
        "stage_busy_per_batch": stage[:, 0].tolist(),
        "stage_idle_per_batch": stage[:, 1].tolist(),
        "stage_transfer_per_batch": stage[:, 2].tolist(),
        "stage_factors_per_batch": stage[:, 3].tolist(),
        "coordinator_per_batch": {part: s / timed for part, s in watch.seconds.items()},
        "batches_per_call": getattr(pipeline, "batches_per_call", 1),
        # what the pipeline measured to choose its batches per call (none where they were given)
        "chosen_from": next((e for e in pipeline.events() if e["kind"] == "batches_per_call"), None),
        "max_in_flight": pipeline.max_in_flight,
        "untimed_batches": last_untimed + 1,
        "memory_mib": memory,
    }


def overhead_share(run: dict, batch_size: int) -> float:
    """What the slowest stage's batch costs beyond its compute (the call, the hops, collection, waiting),
    over that compute: the pipeline's period per batch minus the stage's step time, over its step time."""
    s_ = int(np.argmax(run["stage_busy_per_batch"]))
    compute = run["stage_busy_per_batch"][s_] - run["stage_transfer_per_batch"][s_]
    return (batch_size / run["samples_per_second"] - compute) / compute


@ray.remote(num_cpus=0)
class Echo:
    def pass_on(self, x):
        return x

    def make(self, kind: str):
        array = np.random.default_rng(0).random((256, 1024), dtype=np.float32)
        return array if kind == "numpy" else torch.from_numpy(array)


def hop_ms(kind: str, hops: int = 50) -> float:
    """Milliseconds per actor-to-actor pass of one 256 x 1024 float32 batch (1 MiB)."""
    env = {"env_vars": {"RAY_ENABLE_ZERO_COPY_TORCH_TENSORS": "1"}} if kind == "torch zero-copy" else None
    a, b = (Echo.options(runtime_env=env).remote() for _ in range(2))
    ref = a.make.remote("numpy" if kind == "numpy" else "torch")
    ray.get(b.pass_on.remote(ref))
    started = time.perf_counter()
    for i in range(hops):
        ref = (a if i % 2 else b).pass_on.remote(ref)
    ray.get(ref)
    return 1e3 * (time.perf_counter() - started) / hops


@ray.remote(num_cpus=0, num_gpus=0.5)
class CudaEcho:
    """Two of these share one GPU, as two stages do with ray.gpus_per_stage=0.5: a 1 MiB batch of activations
    passed on through the host, as the pipeline sends it, or kept on the GPU and passed by CUDA IPC handle
    (Ray Direct Transport, alpha in Ray 2.60), each hop a new tensor as a stage's step makes."""

    def make_on_host(self):
        return torch.rand(256, 1024, device="cuda").cpu().numpy()

    def pass_on_host(self, x):
        return (torch.from_numpy(x).cuda() + 1.0).cpu().numpy()

    @ray.method(tensor_transport="cuda_ipc")
    def make_on_device(self):
        return torch.rand(256, 1024, device="cuda")

    @ray.method(tensor_transport="cuda_ipc")
    def pass_on_device(self, x):
        return x + 1.0

    def total(self, x) -> float:
        return float(torch.as_tensor(x, device="cuda").sum())


def gpu_hop_ms(transport: str, hops: int = 50) -> float:
    """Milliseconds per actor-to-actor pass of one 256 x 1024 float32 batch between two actors sharing the GPU:
    `host` (to numpy and back, through the object store) or `cuda_ipc` (Ray Direct Transport)."""
    a, b = CudaEcho.remote(), CudaEcho.remote()
    on_device = transport == "cuda_ipc"
    make, pass_on = ("make_on_device", "pass_on_device") if on_device else ("make_on_host", "pass_on_host")
    try:
        ref = getattr(a, make).remote()
        # Bounded: an alpha API that hangs must not cost the run the figures it has measured already.
        ray.get(b.total.remote(getattr(b, pass_on).remote(ref)), timeout=120)  # warm: CUDA contexts, IPC handles
        started = time.perf_counter()
        for i in range(hops):
            ref = getattr(a if i % 2 else b, pass_on).remote(ref)
        ray.get(a.total.remote(ref), timeout=60)
        return 1e3 * (time.perf_counter() - started) / hops
    finally:  # their GPU shares go back either way
        for actor in (a, b):
            ray.kill(actor)


def _busy_by_stage(run: dict) -> str:
    """Each stage's busy ms per batch, the first's with the part it spent computing the kernel factors."""
    busy = [f"{1e3 * b:.1f}" for b in run["stage_busy_per_batch"]]
    busy[0] += f" ({1e3 * run['stage_factors_per_batch'][0]:.1f})"
    return " / ".join(busy)


def _chosen_from(event) -> str:
    if event is None:
        return "given"
    return f"{event['step_ms']:.1f} / {event['call_overhead_ms']:.1f} -> {event['batches_per_call']}"


def plot_throughput(results: dict, best_threads: int, path: str, title: str) -> None:
    """Samples/s against stages, one line per place factors were computed, and the in-process trainer's best."""
    runs = results["pipeline"]
    series = {
        f"ray pipeline, factors on {where}": [
            (r["stages"], r["samples_per_second"]) for r in runs if r["factors_on"] == where
        ]
        for where in dict.fromkeys(r["factors_on"] for r in runs)
    }
    best, stages = results["in_process"][best_threads], sorted({r["stages"] for r in runs})
    series[f"in process ({best_threads} threads)"] = [(n, best) for n in stages]
    plot_curves(series, path, xlabel="stages", ylabel="samples/s", title=title, xticks=stages, ymin=0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--depth", type=int, default=6, help="hidden blocks (6: 8 layers, enough for 8 stages)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5, help="batches after the pipeline's fill before the clock starts")
    p.add_argument("--batches-per-call", type=int, help="default: chosen by the pipeline from the step time")
    p.add_argument("--max-in-flight", type=int, help="default: the pipeline's, 2 x stages x batches per call")
    p.add_argument(
        "--factors-on",
        nargs="+",
        choices=("auto", *FACTORS_ON),
        default=["auto"],
        help="where batches' factors are computed (ray.factors_on), each measured in turn; auto: the "
        "pipeline's choice (the first stage when stages have GPUs)",
    )
    p.add_argument(
        "--factor-group",
        type=_factor_group,
        default=None,
        metavar="N|auto",
        help="batches whose factors are computed in one call (train.factor_group), in process and by a first "
        "stage that computes them; auto (default): the trainer's choice (8 on a GPU, 1 on a CPU)",
    )
    p.add_argument(
        "--threads-per-stage", action="store_true", help="give each stage cores / stages threads (default 1)"
    )
    p.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="cuda: the in-process trainer on the GPU and the stages sharing it (1 / stages GPU each)",
    )
    p.add_argument(
        "--in-process-threads",
        type=int,
        nargs="+",
        help="thread counts to time the in-process trainer at (default: 1, 2, half and all cores)",
    )
    p.add_argument(
        "--long", type=int, default=0, metavar="STEPS", help="also sample object-store use over a run this long"
    )
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--plot", metavar="PNG", help="also draw samples/s against stages, beside the in-process trainer's")
    args = p.parse_args(argv)
    keep_freed_memory()  # as a run's processes do, the in-process trainer's here included
    for path in filter(None, (args.json, args.plot)):
        if not os.path.isdir(os.path.dirname(path) or "."):
            p.error(f"{path}: its directory does not exist; create it first")

    cfg = build_config(
        "paper_mlp",
        overrides={"model.depth": args.depth, "model.width": args.width, "train.factor_group": args.factor_group},
    )
    data = load_dataset(cfg.data)
    objective = HSICObjective(cfg.hsic, data.num_classes)
    batch = cfg.train.batch_size
    cores = os.cpu_count()
    group = factor_group_size(args.factor_group, args.device, batch)
    print(
        f"# hsic-ray pipeline benchmark ({platform.machine()}, {cores} cores, torch {torch.__version__}, "
        f"ray {ray.__version__}; width {args.width}, {cfg.num_hsic_layers} layers, batch {batch}; factors of "
        f"{group} batches per call where the loop or a first stage computes them)\n"
    )

    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here")
    card = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine()
    results = {"device": device, "card": card, "cores": cores, "factor_group": group, "in_process": {}, "pipeline": []}
    for threads in sorted(set(args.in_process_threads or {1, 2, cores // 2, cores}) - {0}):
        torch.set_num_threads(threads)
        local = drive(
            LocalPipeline(build_seeded_network(cfg, data), objective, cfg.optim, device),
            objective,
            data,
            batch,
            args.steps,
            args.warmup,
            factor_group=args.factor_group,
        )
        results["in_process"][threads] = local["samples_per_second"]
    best_threads = max(results["in_process"], key=results["in_process"].get)
    best = results["in_process"][best_threads]
    gpus = 1 if device == "cuda" else 0
    ray.init(
        address="local",
        num_cpus=max(max(args.stages), cores) + 1,
        num_gpus=gpus,
        include_dashboard=False,
        logging_level="ERROR",
    )
    torch.set_num_threads(1)  # the coordinator's share, as in a real run
    costs = layer_step_costs(build_seeded_network(cfg, data), batch)
    print(
        "| trainer | stages | factors on | batches per call | in flight | samples/s | vs in-process "
        "| slowest stage ms/batch | efficiency |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    print(
        f"| in-process (best of {sorted(results['in_process'])} threads: {best_threads}) | 1 | {device} | - | 1 "
        f"| {best:.0f} | 1.00x | - | - |",
        flush=True,
    )
    for stages, factors_on in itertools.product(args.stages, args.factors_on):
        cfg.ray.stages, cfg.ray.cpus_per_stage = stages, max(1, cores // stages) if args.threads_per_stage else 1
        cfg.ray.batches_per_call, cfg.ray.max_in_flight = args.batches_per_call, args.max_in_flight
        cfg.ray.gpus_per_stage = gpus / stages
        cfg.ray.factors_on = None if factors_on == "auto" else factors_on
        totals = {"CPU": float(stages * cfg.ray.cpus_per_stage + 1), "GPU": float(gpus)}
        pipeline = RayPipeline(cfg, plan_stages(cfg.ray, costs, totals), data.input_shape, data.num_classes)
        run = drive(pipeline, objective, data, batch, args.steps, args.warmup, factor_group=args.factor_group)
        pipeline.shutdown()
        slowest = max(run["stage_busy_per_batch"])
        run.update(
            stages=stages,
            factors_on=pipeline.factors_on,
            mps=any(where["mps"] for where in pipeline.placements),  # stages sharing the GPU through MPS
            efficiency=run["samples_per_second"] / (batch / slowest),
            overhead_share=overhead_share(run, batch),
        )
        results["pipeline"].append(run)
        print(
            f"| ray pipeline{' (MPS)' if run['mps'] else ''} | {stages} | {run['factors_on']} "
            f"| {run['batches_per_call']} | {run['max_in_flight']} "
            f"| {run['samples_per_second']:.0f} | {run['samples_per_second'] / best:.2f}x | {1e3 * slowest:.1f} "
            f"| {run['efficiency']:.2f} |",
            flush=True,
        )

    print("\n## Where a batch's time goes (ms per batch)\n")
    print(
        "| stages | factors on | coordinator: factors (thread) | waiting for factors | submit | waiting for results "
        "| slowest stage: busy | of which transfer | idle | Ray overhead / compute "
        "| each stage busy (first: of which factors) | batches per call chosen from: step / wait between calls |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for run in results["pipeline"]:
        c = {k: 1e3 * v for k, v in run["coordinator_per_batch"].items()}
        s_ = int(np.argmax(run["stage_busy_per_batch"]))
        print(
            f"| {run['stages']} | {run['factors_on']} | {c.get('factors', 0):.1f} | "
            f"{c.get('waiting for factors', 0):.1f} | {c.get('submit', 0):.1f} "
            f"| {c.get('waiting for results', 0):.1f} | {1e3 * run['stage_busy_per_batch'][s_]:.1f} "
            f"| {1e3 * run['stage_transfer_per_batch'][s_]:.1f} | {1e3 * run['stage_idle_per_batch'][s_]:.1f} "
            f"| {run['overhead_share']:.2f} | {_busy_by_stage(run)} | {_chosen_from(run['chosen_from'])} |"
        )

    print("\n| activations sent as | ms per actor-to-actor hop (1 MiB batch) |")
    print("|---|---|")
    results["hop_ms"] = {}
    for kind in ("numpy", "torch", "torch zero-copy"):
        results["hop_ms"][kind] = hop_ms(kind)
        print(f"| {kind} | {results['hop_ms'][kind]:.2f} |", flush=True)
    if device == "cuda":  # between actors sharing the GPU: the way the pipeline sends, and by CUDA IPC handle
        for transport in ("host", "cuda_ipc"):
            kind = f"CUDA tensor, {'through the host' if transport == 'host' else 'CUDA IPC (Ray Direct Transport)'}"
            try:
                results["hop_ms"][kind] = gpu_hop_ms(transport)
            except Exception as exc:  # an alpha API: say what failed, keep the figures measured
                print(f"| {kind} | failed: {type(exc).__name__}: {exc} |", flush=True)
                continue
            print(f"| {kind} | {results['hop_ms'][kind]:.2f} |", flush=True)

    if args.long:
        cfg.ray.stages, cfg.ray.cpus_per_stage = min(args.stages), 1
        pipeline = RayPipeline(
            cfg,
            plan_stages(cfg.ray, costs, {"CPU": cfg.ray.stages + 1.0, "GPU": 0.0}),
            data.input_shape,
            data.num_classes,
        )
        run = drive(
            pipeline, objective, data, batch, args.long, args.warmup, sample_memory_every=max(1, args.long // 10)
        )
        pipeline.shutdown()
        results["object_store_mib"] = run["memory_mib"]
        print(
            f"\nobject store over {args.long} steps ({cfg.ray.stages} stages): "
            + ", ".join(f"step {i}: {m:.0f} MiB" for i, m in run["memory_mib"])
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    if args.plot:
        plot_throughput(
            results,
            best_threads,
            args.plot,
            title=f"{card}, {cores} cores: width {args.width}, {cfg.num_hsic_layers} layers, batch {batch}",
        )
    ray.shutdown()


if __name__ == "__main__":
    main()

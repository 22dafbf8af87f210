"""Throughput of the Ray pipeline against the in-process trainer, on the same config and machine.

    python benchmarks/bench_pipeline.py                       # 2, 4, 8 stages, width 1024, 8 layers
    python benchmarks/bench_pipeline.py --stages 2 --steps 60 --width 256
    python benchmarks/bench_pipeline.py --long 600            # object-store use over a long run

Prints samples/s of each, the pipeline efficiency (measured throughput over 1 / slowest stage's busy time
per batch), the actor-to-actor hop cost of one batch of activations for each way of sending it, and the
object store's use sampled through the run (it must stay flat: in-flight batches are bounded).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import re
import time

import numpy as np
import ray
import torch
from ray._private.internal_api import memory_summary

from hsic_ray.config import build_config
from hsic_ray.data import iterate_batches, load_dataset
from hsic_ray.distributed.pipeline import RayPipeline
from hsic_ray.distributed.placement import plan_stages
from hsic_ray.experiment import build_seeded_network
from hsic_ray.local import LocalPipeline
from hsic_ray.models import layer_step_costs
from hsic_ray.objective import HSICObjective


def object_store_mib() -> float:
    match = re.search(r"Plasma memory usage (\d+) MiB", memory_summary(stats_only=True))
    return float(match.group(1)) if match else float("nan")


def batches(data, batch_size, steps):
    epoch = 1
    while True:
        for batch in iterate_batches(data.x_train, data.y_train, batch_size, seed=0, epoch=epoch):
            yield batch
            steps -= 1
            if steps == 0:
                return
        epoch += 1


def drive(pipeline, objective, data, batch_size, steps, warmup, sample_memory_every=0):
    """The trainer's loop without its logging: submit with bounded in-flight batches, collect results."""
    pending = collections.deque()
    busy = np.zeros(getattr(pipeline, "num_stages", 1))
    memory = []
    started, timed = None, 0
    for i, batch in enumerate(batches(data, batch_size, steps + warmup)):
        if i == warmup:
            started = time.perf_counter()
        pending.append((i, pipeline.submit(batch.x, objective.targets(batch.x, batch.y))))
        while len(pending) >= pipeline.max_in_flight:
            j, handle = pending.popleft()
            result = pipeline.result(handle, want_output=False)
            if j >= warmup:
                timed += 1
                if result.stage_seconds:
                    busy += [b for b, _ in result.stage_seconds]
        if sample_memory_every and i % sample_memory_every == 0:
            memory.append((i, object_store_mib()))
    while pending:
        j, handle = pending.popleft()
        result = pipeline.result(handle, want_output=False)
        timed += 1
        if result.stage_seconds:
            busy += [b for b, _ in result.stage_seconds]
    seconds = time.perf_counter() - started
    return {"samples_per_second": timed * batch_size / seconds, "stage_busy_per_batch": (busy / timed).tolist(),
            "memory_mib": memory}  # fmt: skip


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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--depth", type=int, default=6, help="hidden blocks (6: 8 layers, enough for 8 stages)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--long", type=int, default=0, metavar="STEPS", help="also sample object-store use over a run this long")
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)

    cfg = build_config("paper_mlp", overrides={"model.depth": args.depth, "model.width": args.width})
    data = load_dataset(cfg.data)
    objective = HSICObjective(cfg.hsic, data.num_classes)
    batch = cfg.train.batch_size
    cores = os.cpu_count()
    print(f"# hsic-ray pipeline benchmark ({platform.machine()}, {cores} cores, torch {torch.__version__}, "
          f"ray {ray.__version__}; width {args.width}, {cfg.num_hsic_layers} layers, batch {batch})\n")  # fmt: skip

    device = "cuda" if torch.cuda.is_available() else "cpu"
    local = drive(LocalPipeline(build_seeded_network(cfg, data), objective, cfg.optim, device),
                  objective, data, batch, args.steps, args.warmup)  # fmt: skip
    results = {"in_process": local, "pipeline": {}}
    ray.init(address="local", num_cpus=max(args.stages) + 1, include_dashboard=False, logging_level="ERROR")
    torch.set_num_threads(1)  # the coordinator's share, as in a real run
    costs = layer_step_costs(build_seeded_network(cfg, data), batch)
    print("| trainer | stages | samples/s | vs in-process | slowest stage ms/batch | efficiency |")
    print("|---|---|---|---|---|---|")
    print(f"| in-process ({torch.get_num_interop_threads()} interop, all threads) | 1 | "
          f"{local['samples_per_second']:.0f} | 1.00x | - | - |", flush=True)  # fmt: skip
    for stages in args.stages:
        cfg.ray.stages = stages
        totals = {"CPU": float(stages + 1), "GPU": float(torch.cuda.device_count())}
        pipeline = RayPipeline(cfg, plan_stages(cfg.ray, costs, totals), data.input_shape, data.num_classes)
        run = drive(pipeline, objective, data, batch, args.steps, args.warmup)
        pipeline.shutdown()
        slowest = max(run["stage_busy_per_batch"])
        run["efficiency"] = run["samples_per_second"] / (batch / slowest)
        results["pipeline"][stages] = run
        ratio = run["samples_per_second"] / local["samples_per_second"]
        print(f"| ray pipeline | {stages} | {run['samples_per_second']:.0f} | {ratio:.2f}x | {1e3 * slowest:.1f} | "
              f"{run['efficiency']:.2f} |", flush=True)  # fmt: skip

    print("\n| activations sent as | ms per actor-to-actor hop (1 MiB batch) |")
    print("|---|---|")
    results["hop_ms"] = {}
    for kind in ("numpy", "torch", "torch zero-copy"):
        results["hop_ms"][kind] = hop_ms(kind)
        print(f"| {kind} | {results['hop_ms'][kind]:.2f} |", flush=True)

    if args.long:
        cfg.ray.stages = min(args.stages)
        pipeline = RayPipeline(cfg, plan_stages(cfg.ray, costs, {"CPU": cfg.ray.stages + 1.0, "GPU": 0.0}),
                               data.input_shape, data.num_classes)  # fmt: skip
        run = drive(pipeline, objective, data, batch, args.long, args.warmup, sample_memory_every=max(1, args.long // 10))
        pipeline.shutdown()
        results["object_store_mib"] = run["memory_mib"]
        print(f"\nobject store over {args.long} steps ({cfg.ray.stages} stages): "
              + ", ".join(f"step {i}: {m:.0f} MiB" for i, m in run["memory_mib"]))  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    ray.shutdown()


if __name__ == "__main__":
    main()

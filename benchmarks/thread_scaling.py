"""How a stage's CPU step scales with its threads: what bounds a pipeline of few-thread stages.

    python benchmarks/thread_scaling.py                          # 2 layers, 1 and 2 threads
    python benchmarks/thread_scaling.py --layers 2 16 --threads 1 2 4 8 16
    python benchmarks/thread_scaling.py --top 6          # also the largest operations besides the products

A pipeline of S stages x T threads on S x T cores beats the in-process trainer on all cores by at most
(in-process step time) / (one stage's step time) when its stages are never idle (efficiency 1). This times
the paper MLP's step (width 1024, batch 256, cca) of a stage of `--layers` hidden layers at each thread
count, fastest of `--rounds` rounds, and splits it with torch's profiler into the matrix products (the
layers' forward and weight gradients, the kernels' Gram matrices: BLAS) and everything else (the kernels'
solves, elementwise work, the optimizer), each with its speed-up over one thread.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

from hsic_ray.config import build_config
from hsic_ray.data import iterate_batches, load_dataset
from hsic_ray.experiment import build_seeded_network
from hsic_ray.objective import HSICObjective
from hsic_ray.stage_step import StageStep

MATRIX_PRODUCTS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul")


def stage_and_input(layers: int, width: int):
    """A stage of `layers` hidden layers of the seeded paper MLP, the batch its first layer sees, and factors."""
    cfg = build_config("paper_mlp", overrides={"model.depth": layers, "model.width": width})
    data = load_dataset(cfg.data)
    net = build_seeded_network(cfg, data)
    objective = HSICObjective(cfg.hsic, data.num_classes)
    batch = next(iterate_batches(data.x_train, data.y_train, cfg.train.batch_size, seed=0, epoch=1))
    with torch.no_grad():
        x = net.layers[0](batch.x).detach()  # the input block's output: what the hidden layers take
    stage = StageStep(list(net.layers)[1 : 1 + layers], objective, cfg.optim)
    return stage, x, objective.kernel_factors(batch.x, batch.y)


def time_step(stage: StageStep, x, factors, steps: int, rounds: int) -> float:
    for _ in range(2):
        stage.train_step(x, factors)
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(steps):
            stage.train_step(x, factors)
        best = min(best, (time.perf_counter() - started) / steps)
    return best


def profile_step(stage: StageStep, x, factors, steps: int) -> tuple[float, list[tuple[str, float]]]:
    """The share of a step's CPU time spent in matrix products, and the other operations' shares, largest first."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            stage.train_step(x, factors)
    events = prof.key_averages()
    total = max(sum(e.self_cpu_time_total for e in events), 1e-9)
    products = sum(e.self_cpu_time_total for e in events if e.key in MATRIX_PRODUCTS) / total
    others = sorted(
        ((e.key, e.self_cpu_time_total / total) for e in events if e.key not in MATRIX_PRODUCTS),
        key=lambda item: -item[1],
    )
    return products, others


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, nargs="+", default=[2], help="hidden layers per stage")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--steps", type=int, default=4, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--top", type=int, default=0, metavar="N", help="also print the N largest other operations")
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)

    print(
        f"# stage step vs threads ({platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; "
        f"width {args.width}, batch 256, cca)\n"
    )
    print(
        "| layers | threads | ms per step | speed-up | matrix products ms | their speed-up | the rest ms | its "
        "speed-up |"
    )
    print("|---|---|---|---|---|---|---|---|")
    results = []
    for layers in args.layers:
        stage, x, factors = stage_and_input(layers, args.width)
        base = None
        for threads in args.threads:
            torch.set_num_threads(threads)
            seconds = time_step(stage, x, factors, args.steps, args.rounds)
            share, others = profile_step(stage, x, factors, args.steps)
            row = {
                "layers": layers,
                "threads": threads,
                "step_ms": 1e3 * seconds,
                "matrix_ms": 1e3 * seconds * share,
                "rest_ms": 1e3 * seconds * (1 - share),
                "other_ops_ms": {name: 1e3 * seconds * part for name, part in others[: args.top]},
            }
            base = base or row
            results.append(row)
            print(
                f"| {layers} | {threads} | {row['step_ms']:.1f} | {base['step_ms'] / row['step_ms']:.2f}x "
                f"| {row['matrix_ms']:.1f} | {base['matrix_ms'] / row['matrix_ms']:.2f}x "
                f"| {row['rest_ms']:.1f} | {base['rest_ms'] / row['rest_ms']:.2f}x |",
                flush=True,
            )
    for row in results:
        if row["other_ops_ms"]:
            ops = ", ".join(f"{name} {ms:.1f}" for name, ms in row["other_ops_ms"].items())
            print(f"\n{row['layers']} layers, {row['threads']} threads, the rest's largest (ms per step): {ops}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cores": os.cpu_count(), "rows": results}, f, indent=2)
    return {"rows": results}


if __name__ == "__main__":
    main()

"""One short GPU check of the stage step: its speed against its floor and backprop, and time to accuracy.

    python -m benchmarks.gpu_check --data .data/fashion-mnist-dev.npz --json benchmarks/results/gpu_check_h100.json
    python -m benchmarks.gpu_check --pipeline ...        # also the Ray pipeline, stages sharing the GPU
    python -m benchmarks.gpu_check --device cpu --smoke  # the script's own check, on any machine, in seconds

1. ms per training step of the paper MLP (width 1024, batch 256, cca) at depth 5, 20 and 50, every layer in
   one stage: the HSIC step, its floor (same layers and step, trivial loss), eager backprop of the same
   network plus head; with CUDA graphs on and off (`benchmarks/bench_local.py`).
2. Time to accuracy: 5 epochs of `paper_mlp` (beta 1000, the authors' Fashion-MNIST setting) on the
   Fashion-MNIST dev data, HSIC in process against backprop of the same network on the same device and data
   order: wall time, training time and validation accuracy.
3. With --pipeline (needs Ray): the Ray pipeline with 2 and 4 stages sharing the GPU.

The device machine gets only the repository: copy the dev data into an ignored folder of it (e.g. `.data/`)
and carry that folder.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from benchmarks.bench_local import step_comparison
from hsic_ray.config import build_config
from hsic_ray.experiment import run_backprop, run_hsic


def step_table(device: str, depths: list[int], graph_settings: list[str], steps: int) -> list[dict]:
    rows = []
    for graphs in graph_settings:
        for depth in depths:
            row = {"cuda_graphs": graphs, **step_comparison(depth, steps, device, graphs)}
            rows.append(row)
            print(
                f"cuda graphs {graphs:>4}, depth {depth:>2}: HSIC {row['hsic_ms']:.2f} ms, floor "
                f"{row['floor_ms']:.2f} ms "
                f"({row['hsic_over_floor']:.2f}x), backprop {row['backprop_ms']:.2f} ms "
                f"({row['hsic_over_backprop']:.2f}x)",
                flush=True,
            )
    return rows


def time_to_accuracy(data: str, device: str, graphs: str, smoke: bool) -> dict:
    overrides = {
        "data.source": f"npz:{data}",
        "hsic.beta": 1000.0,
        "trainer": "local",
        "train.device": device,
        "train.cuda_graphs": graphs,
        "train.log_every": 50,
    }
    if smoke:
        overrides.update({"train.max_steps": 3, "train.epochs": 1, "head.epochs": 1})
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method, run in (("hsic", run_hsic), ("backprop", run_backprop)):
            cfg = build_config("paper_mlp", overrides={**overrides, "output": f"{tmp}/{method}"})
            started = time.perf_counter()
            metrics = run(cfg)
            keys = ("test_accuracy_formatted", "test_accuracy_unformatted", "train_seconds", "steps")
            out[method] = {k: metrics.get(k) for k in keys} | {"wall_seconds": time.perf_counter() - started}
            print(f"{method}: {out[method]}", flush=True)
    out["train_time_ratio"] = out["hsic"]["train_seconds"] / out["backprop"]["train_seconds"]
    out["wall_time_ratio"] = out["hsic"]["wall_seconds"] / out["backprop"]["wall_seconds"]
    print(
        f"HSIC / backprop: training time {out['train_time_ratio']:.2f}x, wall time {out['wall_time_ratio']:.2f}x",
        flush=True,
    )
    return out


def pipeline_check(device: str) -> dict:
    import ray

    from benchmarks.bench_pipeline import drive
    from hsic_ray.data import load_dataset
    from hsic_ray.distributed.placement import plan_stages
    from hsic_ray.distributed.ray_pipeline import RayPipeline
    from hsic_ray.experiment import build_seeded_network
    from hsic_ray.models import layer_step_costs
    from hsic_ray.objective import HSICObjective

    cfg = build_config("paper_mlp", overrides={"model.depth": 6})
    data = load_dataset(cfg.data)
    objective = HSICObjective(cfg.hsic, data.num_classes)
    ray.init(address="local", num_cpus=8, num_gpus=1, include_dashboard=False, logging_level="ERROR")
    costs = layer_step_costs(build_seeded_network(cfg, data), 256)
    out = {}
    for stages in (2, 4):
        cfg.ray.stages, cfg.ray.gpus_per_stage = stages, 1.0 / stages
        pipeline = RayPipeline(cfg, plan_stages(cfg.ray, costs, {"CPU": 8.0, "GPU": 1.0}), data.input_shape, 10)
        run = drive(pipeline, objective, data, 256, 60, 10)
        pipeline.shutdown()
        out[stages] = {
            "samples_per_second": run["samples_per_second"],
            "stage_busy_per_batch": run["stage_busy_per_batch"],
        }
        print(f"ray pipeline, {stages} stages on one GPU: {run['samples_per_second']:.0f} samples/s", flush=True)
    ray.shutdown()
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="../shared/datasets/fashion-mnist-dev.npz", help="the Fashion-MNIST dev npz")
    p.add_argument("--device", default="cuda")
    p.add_argument("--smoke", action="store_true", help="depth 5 only, 3 training steps: checks the script itself")
    p.add_argument("--pipeline", action="store_true", help="also the Ray pipeline with stages sharing the GPU")
    p.add_argument(
        "--steps-only",
        action="store_true",
        help="leave out part 2 (benchmarks/time_to_accuracy.py measures it from the command, for four methods)",
    )
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        p.error("no CUDA device: run on a GPU machine, or pass --device cpu (with --smoke to check the script)")
    card = torch.cuda.get_device_name() if cuda else "cpu"
    out = {"device": card, "torch": torch.__version__}
    print(f"# GPU check on {card} (torch {torch.__version__})", flush=True)
    graph_settings = ["on", "off"] if cuda else ["off"]
    out["steps"] = step_table(args.device, [5] if args.smoke else [5, 20, 50], graph_settings, 1 if args.smoke else 10)
    if not args.steps_only:
        out["time_to_accuracy"] = time_to_accuracy(args.data, args.device, "auto", args.smoke)
    if args.pipeline:
        out["pipeline"] = pipeline_check(args.device)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()

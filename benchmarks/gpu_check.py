"""One short GPU check: estimators and training steps on CUDA, and the Ray pipeline with stages on the GPU.

    python -m benchmarks.gpu_check --json gpu.json

Needs one CUDA GPU. Stages share it through fractional GPUs (1 / stages each), so the pipeline figures
show the pipeline's overhead on one device, not multi-GPU scaling.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import ray
import torch

from benchmarks.bench_local import estimator_ms, step_seconds
from benchmarks.bench_pipeline import drive
from hsic_ray.config import build_config
from hsic_ray.data import load_dataset
from hsic_ray.distributed.pipeline import RayPipeline
from hsic_ray.distributed.placement import plan_stages
from hsic_ray.experiment import build_seeded_network, run_hsic
from hsic_ray.local import LocalPipeline
from hsic_ray.models import layer_step_costs
from hsic_ray.objective import HSICObjective


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    assert torch.cuda.is_available(), "gpu_check needs a CUDA GPU"
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "ray": ray.__version__}
    print(f"# GPU check on {out['device']} (torch {out['torch']}, ray {out['ray']})", flush=True)

    out["estimators_ms"] = {m: estimator_ms(m, repeats=20, device="cuda") for m in (256, 512, 1024, 2048)}
    for m, timings in out["estimators_ms"].items():
        print(f"m={m}: " + ", ".join(f"{k} {v['forward_ms']:.2f}/{v['fwd_bwd_ms']:.2f} ms" for k, v in timings.items()), flush=True)
    out["step_seconds"] = {d: step_seconds(d, steps=10, device="cuda") for d in (5, 20, 50)}
    print("in-process s/step on cuda (paper config): " + ", ".join(f"depth {d}: {s:.4f}" for d, s in out["step_seconds"].items()), flush=True)

    cfg = build_config("paper_mlp", overrides={"model.depth": 6})
    data = load_dataset(cfg.data)
    objective = HSICObjective(cfg.hsic, data.num_classes)
    local = drive(LocalPipeline(build_seeded_network(cfg, data), objective, cfg.optim, "cuda"), objective, data, 256, 60, 10)
    out["in_process_samples_per_second"] = local["samples_per_second"]
    print(f"in-process on cuda: {local['samples_per_second']:.0f} samples/s", flush=True)

    ray.init(address="local", num_cpus=8, num_gpus=1, include_dashboard=False, logging_level="ERROR")
    costs = layer_step_costs(build_seeded_network(cfg, data), 256)
    out["pipeline"] = {}
    for stages in (2, 4):
        cfg.ray.stages, cfg.ray.gpus_per_stage = stages, 1.0 / stages
        pipeline = RayPipeline(cfg, plan_stages(cfg.ray, costs, {"CPU": 8.0, "GPU": 1.0}), data.input_shape, 10)
        devices = [pl["device"] for pl in pipeline.placements]
        run = drive(pipeline, objective, data, 256, 60, 10)
        pipeline.shutdown()
        out["pipeline"][stages] = {"samples_per_second": run["samples_per_second"], "devices": devices,
                                   "stage_busy_per_batch": run["stage_busy_per_batch"]}  # fmt: skip
        print(f"ray pipeline, {stages} stages on {devices}: {run['samples_per_second']:.0f} samples/s, "
              f"stage busy ms/batch {[round(1e3 * b, 1) for b in run['stage_busy_per_batch']]}", flush=True)  # fmt: skip

    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        run_cfg = build_config("paper_mlp", overrides={"trainer": "ray", "output": f"{tmp}/run", "ray.stages": 2,
                                                       "ray.gpus_per_stage": 0.5, "train.epochs": 5})  # fmt: skip
        metrics = run_hsic(run_cfg, data)
        out["paper_mlp_ray_gpu"] = {k: metrics[k] for k in ("test_accuracy_unformatted", "test_accuracy_formatted",
                                                           "train_seconds", "samples_per_second")}  # fmt: skip
        out["paper_mlp_ray_gpu"]["wall_seconds"] = time.perf_counter() - started
        print(f"paper_mlp, 5 epochs, ray trainer, 2 stages on the GPU: {out['paper_mlp_ray_gpu']}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()

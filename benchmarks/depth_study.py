"""What keeps a deep HSIC net's information: named variants of `deep_mlp`, trained in process, several at
once on one device, each run one JSON line (accuracies, time, every layer's linear probe).

    python -m benchmarks.depth_study --data .data/fashion-mnist-dev.npz --workers 6 --out study.jsonl
    python -m benchmarks.depth_study --only hsic-d50 bp-d50 --out study.jsonl    # some variants
    python -m benchmarks.depth_study --device cpu --smoke --out /tmp/smoke.jsonl  # the script's own check

Variants run in the order listed (the comparisons that matter most first), so a run stopped at a deadline
(`--deadline-s`) keeps the most useful ones. Each run's `probes.png` is copied beside the JSON lines.
Every variant is the preset plus overrides: rerun one with `python jobs/train_deep.py --preset deep_mlp
--dataset npz:... --data-family fashion-mnist --trainer local KEY=VALUE ...` (or jobs/train_backprop.py).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

D50 = {"model.depth": 50}
# (name, method, overrides of deep_mlp); the mnist-sample rows check that what holds on Fashion-MNIST holds
# on the bundled digits too.
VARIANTS: list[tuple[str, str, dict[str, Any]]] = [
    ("hsic-d5", "hsic", {"model.depth": 5}),
    ("hsic-d50", "hsic", D50),
    ("bp-d50", "backprop", D50),
    ("hsic-d50-in-sample", "hsic", {**D50, "hsic.leave_one_out": False}),  # the paper's nHSIC
    ("bp-d5", "backprop", {"model.depth": 5}),
    ("hsic-d50-inw-100", "hsic", {**D50, "hsic.input_weight_first": -100.0}),
    ("hsic-d50-inw-1000", "hsic", {**D50, "hsic.input_weight_first": -1000.0}),
    ("hsic-d50-lsig2", "hsic", {**D50, "hsic.layer_sigma": 2.0}),
    ("hsic-d50-lsig12", "hsic", {**D50, "hsic.layer_sigma": 12.0}),
    ("hsic-d50-inw-10", "hsic", {**D50, "hsic.input_weight_first": -10.0}),
    ("hsic-d50-lsig1", "hsic", {**D50, "hsic.layer_sigma": 1.0}),
    ("hsic-d50-lr3e-5", "hsic", {**D50, "optim.lr": 3e-5}),
    ("hsic-d50-lr3e-4", "hsic", {**D50, "optim.lr": 3e-4}),
    ("hsic-d50-w1024", "hsic", {**D50, "model.width": 1024}),
    (
        "hsic-d50-authors",
        "hsic",
        {**D50, "model.width": 1024, "train.batch_size": 256, "model.activation": "relu", "model.init": "default"},
    ),
    ("hsic-d10", "hsic", {"model.depth": 10}),
    ("hsic-d20", "hsic", {"model.depth": 20}),
    ("bp-d10", "backprop", {"model.depth": 10}),
    ("bp-d20", "backprop", {"model.depth": 20}),
    ("hsic-d50-beta100", "hsic", {**D50, "hsic.beta": 100.0}),
    ("hsic-d50-last64", "hsic", {**D50, "model.last_width": 64}),
    ("hsic-d50-inw-100-lsig2", "hsic", {**D50, "hsic.input_weight_first": -100.0, "hsic.layer_sigma": 2.0}),
    ("hsic-d50-inw-100-lr3e-5", "hsic", {**D50, "hsic.input_weight_first": -100.0, "optim.lr": 3e-5}),
    ("mnist-hsic-d5", "hsic", {"model.depth": 5, "data.source": "mnist-sample"}),
    ("mnist-hsic-d50", "hsic", {**D50, "data.source": "mnist-sample"}),
    ("mnist-hsic-d50-inw-100", "hsic", {**D50, "data.source": "mnist-sample", "hsic.input_weight_first": -100.0}),
    ("mnist-hsic-d50-lsig2", "hsic", {**D50, "data.source": "mnist-sample", "hsic.layer_sigma": 2.0}),
    ("hsic-d50-lrs16", "hsic", {**D50, "hsic.lr_scale_last": 1 / 16}),
    ("hsic-d50-lrs100", "hsic", {**D50, "hsic.lr_scale_last": 0.01}),
    ("hsic-d5-lrs16", "hsic", {"model.depth": 5, "hsic.lr_scale_last": 1 / 16}),
    ("mnist-hsic-d20-lrs16", "hsic", {"data.source": "mnist-sample", "hsic.lr_scale_last": 1 / 16}),
    ("hsic-d50-15ep", "hsic", {**D50, "train.epochs": 15}),
    ("hsic-d5-15ep", "hsic", {"model.depth": 5, "train.epochs": 15}),
]
SMOKE = {
    "model.depth": 2,
    "train.max_steps": 2,
    "train.epochs": 1,
    "head.epochs": 1,
    "train.probe_samples": 64,
    "train.eval_samples": 64,
    "train.bn_calibration_batches": 1,
}


def run_variant(job: tuple[str, str, dict[str, Any], dict[str, Any], str, int]) -> dict[str, Any]:
    import torch

    from hsic_ray.config import build_config
    from hsic_ray.experiment import run_backprop, run_hsic

    name, method, overrides, base, plots, threads = job
    torch.set_num_threads(threads)
    settings = {**base, **overrides}
    if settings.get("data.source") == "mnist-sample":
        settings.pop("data.family", None)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = build_config("deep_mlp", overrides={**settings, "output": f"{tmp}/{name}"})
        try:
            metrics = (run_hsic if method == "hsic" else run_backprop)(cfg)
        except Exception as err:  # one failed variant must not cost the others
            return {"name": name, "method": method, "overrides": overrides, "error": f"{type(err).__name__}: {err}"}
        run = Path(tmp, name)
        if (run / "probes.png").exists():
            shutil.copy(run / "probes.png", f"{plots}/{name}.png")
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    keys = ("test_accuracy_formatted", "test_accuracy_unformatted", "train_seconds", "steps", "probes")
    row = {"name": name, "method": method, "overrides": overrides, **{k: metrics.get(k) for k in keys}}
    row["epoch_probes"] = [r["test_accuracy"] for r in records if r.get("kind") == "probes"]
    return row | {"wall_seconds": time.perf_counter() - started}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="../shared/datasets/fashion-mnist-dev.npz", help="the Fashion-MNIST dev npz")
    p.add_argument("--device", default="cuda")
    p.add_argument("--workers", type=int, default=4, help="variants trained at once (each its own process)")
    p.add_argument("--only", nargs="+", metavar="NAME", help="these variants (default: all, in order)")
    p.add_argument("--deadline-s", type=float, default=0, help="start no variant after this many seconds")
    p.add_argument("--smoke", action="store_true", help="tiny runs of the first variants: checks the script")
    p.add_argument("--out", required=True, help="JSON lines, one per run; probe plots go beside it")
    args = p.parse_args(argv)
    known = {name for name, _, _ in VARIANTS}
    if unknown := set(args.only or ()) - known:
        p.error(f"unknown variants {sorted(unknown)}; known: {', '.join(sorted(known))}")
    variants = [v for v in VARIANTS if not args.only or v[0] in args.only][: args.workers if args.smoke else None]
    base = {
        "data.source": f"npz:{args.data}",
        "data.family": "fashion-mnist",
        "trainer": "local",
        "train.device": args.device,
        "train.log_every": 1000,
    } | (SMOKE if args.smoke else {})
    plots = Path(args.out).with_suffix("")
    plots.mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 1) // args.workers)
    started = time.perf_counter()

    waiting, running = list(variants), []
    with (
        multiprocessing.get_context("spawn").Pool(args.workers, maxtasksperchild=1) as pool,
        open(args.out, "a") as out,
    ):
        while waiting or running:
            late = args.deadline_s and time.perf_counter() - started > args.deadline_s
            if waiting and late:
                print(f"deadline: {', '.join(v[0] for v in waiting)} not started", flush=True)
                waiting = []
            while waiting and len(running) < args.workers:
                name, method, overrides = waiting.pop(0)
                running.append(pool.apply_async(run_variant, ((name, method, overrides, base, str(plots), threads),)))
            for done in [r for r in running if r.ready()]:
                running.remove(done)
                row = done.get()
                out.write(json.dumps(row) + "\n")
                out.flush()
                acc = (
                    f"{row.get('test_accuracy_formatted')} formatted, {row.get('test_accuracy_unformatted')} "
                    "unformatted"
                )
                print(f"[{time.perf_counter() - started:6.0f} s] {row['name']}: {row.get('error') or acc}", flush=True)
            time.sleep(0.5)


if __name__ == "__main__":
    main()

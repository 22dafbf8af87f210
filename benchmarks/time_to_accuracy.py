"""Seconds from the command to a target test accuracy: HSIC (in process, on the Ray pipeline) against backprop
(eager, and compiled with torch.compile), same network, device, data and data order.

    python benchmarks/time_to_accuracy.py                                   # paper_mlp to 88%, Fashion dev, CPU
    python benchmarks/time_to_accuracy.py --cases paper_mlp deep_mlp50 --device cuda \
        --json benchmarks/results/time_to_accuracy_gpu.json
    python benchmarks/time_to_accuracy.py --methods hsic-local backprop-eager --epochs 1 --target 50   # a quick look
    python benchmarks/time_to_accuracy.py --cases deep_mlp50 -- train.batch_size=256   # settings for every method
    python benchmarks/time_to_accuracy.py --methods hsic-local backprop-eager --seeds 1 2 3   # every method per seed

Each method runs in its own process, started as a user starts a job, so its clock includes the interpreter,
imports, Ray and compilation. After every epoch it reads the test accuracy cheaply: backprop's own (the
network and head it trains), and for HSIC the least-squares readout of the network's output, which stands in
for the format head that trains only once the layers are done (the run's formatted accuracy is reported too).
The table gives, per method, the seconds from launch to the first epoch at or above the target, and that
epoch; "-" where it was not reached within the epochs run. With `--seeds`, every method runs once per seed
(`train.seed`), one seed's methods back to back, and a second table gives each method's seconds to the target
over eager backprop's, seed by seed and their median: where a readout sits on the target's line after some
epoch, one seed's verdict is a coin toss.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from job_runs import markdown_table, run_each, run_process, write_results

from hsic_ray.errors import ConfigError

CASES = {  # name -> (preset, settings, target test accuracy %)
    "paper_mlp": ("paper_mlp", {}, 88.0),
    "deep_mlp50": ("deep_mlp", {"model.depth": 50}, 87.0),
}
METHODS = ("hsic-local", "hsic-ray", "backprop-eager", "backprop-compiled")


# --- one method, in its own process ------------------------------------------------------------------------


def case_config(case: str, method: str, args: argparse.Namespace, output: str | None = None):
    """The config `method` trains `case` with: the case's preset and settings, then the command's."""
    from hsic_ray.cli import setting
    from hsic_ray.config import build_config

    preset, settings, _ = CASES[case]
    overrides = {
        **settings,
        **dict(setting(text) for text in args.settings),
        "data.source": args.dataset,
        "train.device": args.device,
        "train.epochs": args.epochs,
        "output": output,
        "trainer": "ray" if method == "hsic-ray" else "local",
    }
    if args.dataset.startswith(("npz:", "parquet:")):  # files: the Fashion-MNIST settings (beta) apply
        overrides["data.family"] = "fashion-mnist"
    return build_config(preset, overrides=overrides)


def run_method(method: str, case: str, args: argparse.Namespace, output: str) -> None:
    """Train `case` by `method`; print one JSON line per epoch: its accuracy and the seconds since the process
    began."""
    import psutil

    process_started = psutil.Process().create_time()
    cfg = case_config(case, method, args, output)

    def report(accuracy: float, epoch: int) -> None:
        line = {"epoch": epoch, "accuracy": accuracy, "seconds": time.time() - process_started}
        print("EPOCH " + json.dumps(line), flush=True)

    if method.startswith("hsic"):
        from hsic_ray.experiment import run_hsic

        metrics = run_hsic(cfg, on_epoch=lambda r: report(r["test_accuracy_least_squares"], r["epoch"]))
    else:
        metrics = _backprop(cfg, compiled=method == "backprop-compiled", report=report)
    final = {"formatted": metrics["test_accuracy_formatted"], "seconds": time.time() - process_started}
    print("FINAL " + json.dumps(final), flush=True)


def _backprop(cfg, compiled: bool, report) -> dict:
    """The in-process baseline, its model optionally torch.compile'd (nothing written: its output would hold the
    compiled module's state)."""
    import torch

    from hsic_ray.backprop import BackpropTrainer
    from hsic_ray.data import load_dataset
    from hsic_ray.experiment import build_seeded_network, resolve_device

    data = load_dataset(cfg.data)
    trainer = BackpropTrainer(cfg, data, build_seeded_network(cfg, data), None, resolve_device(cfg.train.device))
    if compiled:
        trainer.model = torch.compile(trainer.model)
    return trainer.fit(on_epoch=lambda r: report(r["test_accuracy"], r["epoch"]))


# --- the comparison ----------------------------------------------------------------------------------------


def measure(method: str, seed: int | None, case: str, args: argparse.Namespace, workdir: Path) -> dict:
    """`method` on `case` in its own process (with `seed`, as train.seed): its readout after every epoch, the
    seconds to the target and the final formatted accuracy."""
    output = str(workdir / f"{case}-{method}-seed{seed}")
    flags = _shared_flags(args) + ([] if seed is None else [f"train.seed={seed}"])
    command = [sys.executable, __file__, "--run", method, "--cases", case, "--output", output, *flags]
    started = time.time()
    done = run_process(command, f"{case} ({method})")
    lines = done.stdout.splitlines()
    epochs = [json.loads(line[6:]) for line in lines if line.startswith("EPOCH ")]
    final = next(json.loads(line[6:]) for line in lines if line.startswith("FINAL "))
    target = args.target if args.target is not None else CASES[case][2]
    reached = next((e for e in epochs if e["accuracy"] >= target), None)
    return {
        "case": case,
        "method": method,
        "seed": seed,
        "target": target,
        "epochs": epochs,
        "reached_epoch": reached and reached["epoch"],
        "seconds_to_target": reached and reached["seconds"],  # since the child process began
        "final_formatted": final["formatted"],
        "wall_seconds": time.time() - started,
    }


def _shared_flags(args: argparse.Namespace) -> list[str]:
    flags = ["--dataset", args.dataset, "--device", args.device, "--epochs", str(args.epochs)]
    flags += ["--target", str(args.target)] if args.target is not None else []
    return flags + ["--", *args.settings]


def table(results: list[dict]) -> str:
    seeded = any(r["seed"] is not None for r in results)
    header = ["case", "method", *(["seed"] if seeded else []), "target %", "s to target", "epoch", "s per epoch"]
    header += ["final %", "wall s"]
    rows = []
    for r in results:
        per_epoch = _seconds_per_epoch(r["epochs"])
        cells = [r["case"], r["method"], *([str(r["seed"])] if seeded else []), f"{r['target']:g}"]
        cells += ["-" if r["seconds_to_target"] is None else f"{r['seconds_to_target']:.1f}"]
        cells += ["-" if r["reached_epoch"] is None else str(r["reached_epoch"]), f"{per_epoch:.1f}"]
        cells += [f"{r['final_formatted']:.2f}", f"{r['wall_seconds']:.1f}"]
        rows.append(cells)
    return markdown_table(header, rows)


def against_backprop(results: list[dict]) -> str:
    """Each method's seconds to the target over eager backprop's in the same case and seed ("-" where either
    missed it), seed by seed, and the median of those that reached it."""
    baseline = {(r["case"], r["seed"]): r["seconds_to_target"] for r in results if r["method"] == "backprop-eager"}
    seeds = list(dict.fromkeys(r["seed"] for r in results))
    rows = []
    for case, method in dict.fromkeys((r["case"], r["method"]) for r in results if r["method"] != "backprop-eager"):
        ratios = []
        for r in results:
            if (r["case"], r["method"]) == (case, method):
                base, own = baseline.get((case, r["seed"])), r["seconds_to_target"]
                ratios.append(None if not (base and own) else own / base)
        reached = [x for x in ratios if x is not None]
        median = f"{statistics.median(reached):.2f}x" if reached else "-"
        rows.append([case, method, *("-" if x is None else f"{x:.2f}x" for x in ratios), median])
    return markdown_table(["case", "method", *(f"seed {seed}" for seed in seeds), "median"], rows)


def _seconds_per_epoch(epochs: list[dict]) -> float:
    if len(epochs) < 2:
        return float("nan")
    return (epochs[-1]["seconds"] - epochs[0]["seconds"]) / (len(epochs) - 1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", choices=sorted(CASES), default=["paper_mlp"])
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--dataset", default="npz:../shared/datasets/fashion-mnist-dev.npz")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--target", type=float, help="test accuracy %% to reach (default: each case's)")
    p.add_argument("--seeds", type=int, nargs="+", help="run every method once per seed (train.seed)")
    p.add_argument("--json", metavar="PATH", help="write the results here too")
    p.add_argument("settings", nargs="*", metavar="KEY=VALUE", help="config settings for every method (after --)")
    p.add_argument("--run", choices=METHODS, help=argparse.SUPPRESS)  # one method, in a child process
    p.add_argument("--output", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.run:
        run_method(args.run, args.cases[0], args, args.output)
        return 0
    try:  # bad settings stop here, before any method starts
        for case in args.cases:
            case_config(case, args.methods[0], args)
    except (ConfigError, argparse.ArgumentTypeError) as exc:
        p.error(str(exc))
    variants = [(method, seed) for seed in args.seeds or [None] for method in args.methods]
    results = run_each(args.cases, variants, lambda case, variant, workdir: measure(*variant, case, args, workdir))
    print(table(results))
    if args.seeds and "backprop-eager" in args.methods and len(args.methods) > 1:
        print("\nSeconds to the target over eager backprop's:\n")
        print(against_backprop(results))
    if args.json:
        write_results(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())

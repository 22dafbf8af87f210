"""Speed of a stage's training step against its floor and against backprop, and of the HSIC estimators.

    python benchmarks/bench_local.py                  # depths 5 20 50, m = 256 512 1024
    python benchmarks/bench_local.py --reference      # also time the authors' schedule, re-created here
    python benchmarks/bench_local.py --depths 5 20 --steps 5 --json out.json
    python benchmarks/bench_local.py --device cuda --cuda-graphs off
    python benchmarks/bench_local.py --arch conv --depths 8 --width 16   # the plain conv net (part 1 only)
    python benchmarks/bench_local.py --arch conv --kernel-views full 4096 1024   # kernels on pooled maps
    python benchmarks/bench_local.py --arch conv --preset deep_conv --depths 20   # the conv preset as users run it

Part 1 times one training step of the paper MLP (width 1024, batch 256, cca, sigma 6) on the bundled
digits, all layers in one stage, three ways: the HSIC step; its floor, the same layers and the same
batched step with a trivial loss (z.square().mean()) in place of HSIC; and eager backprop of the same
network plus its head (cross-entropy, SGD). Part 2 times each estimator on one batch of 1024-wide
activations against 10-class labels; part 3 a batch's kernel factors (784-pixel inputs, 10-class labels), the
labels' by the general m x m solve and in closed form, in the precision the training loop uses there (float64
on a GPU, float32 on a CPU). With --arch conv, part 1 times the plain conv net (model.arch=conv)
instead, its HSIC step with each layer's kernel on the full output and on pooled views
(hsic.max_kernel_features; --kernel-views), from the paper MLP's other settings or `--preset`'s, and skips part
2. The authors' figures were measured on a 2-core machine like this project's CI machine; docs/results.md gives
the machine each of our figures came from.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.nn import functional as F

from hsic_ray.backprop import build_model
from hsic_ray.config import NULL, HSICConfig, build_config
from hsic_ray.data import iterate_batches, load_dataset
from hsic_ray.experiment import build_seeded_network
from hsic_ray.hsic import (
    cca_factor_ex,
    gaussian_kernel,
    hsic_biased,
    hsic_cca,
    hsic_cka,
    one_hot_cca_factor_ex,
    plausible_loss,
)
from hsic_ray.machine import keep_freed_memory
from hsic_ray.objective import AUTO_FACTOR_GROUP, HSICObjective, KernelFactors, StageLosses
from hsic_ray.presets import PRESETS
from hsic_ray.stage_step import StageStep, make_sgd

# Seconds per step of the authors' code on a 2-core machine (issue #2), and their cca forward in ms.
AUTHORS_STEP_SECONDS = {5: 0.36, 10: 1.05, 20: 3.2, 50: 18.5}
AUTHORS_CCA_MS = {256: 4.4, 512: 23.6}


def _timed(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / repeats


def parse_kernel_view(text: str) -> int | None:
    """A --kernel-views value: full (each layer's kernel on its whole output) or hsic.max_kernel_features."""
    if text == "full":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not full or a number of features") from None


def _setup(depth: int, leave_one_out: bool | None = None, preset: str = "paper_mlp", **overrides):
    """`overrides`: config fields on top of the preset's (e.g. model.arch=conv); `leave_one_out`: the
    estimator's fit, where not the preset's."""
    overrides = {"model.depth": depth, **overrides}
    if leave_one_out is not None:
        overrides["hsic.leave_one_out"] = leave_one_out
    cfg = build_config(preset, overrides=overrides)
    data = load_dataset(cfg.data)
    net = build_seeded_network(cfg, data)
    objective = HSICObjective(cfg.hsic, data.num_classes)
    batch = next(iterate_batches(data.x_train, data.y_train, cfg.train.batch_size, seed=0, epoch=1))
    return cfg, net, objective, batch


class TrivialObjective:
    """The floor: each layer's loss is z.square().mean(), through the same batched step as HSIC."""

    def stage_losses(self, zs: Sequence[Tensor], factors: KernelFactors, dtype=None) -> StageLosses:
        loss = torch.stack([z.square().mean() for z in zs])
        zeros = torch.zeros_like(loss)
        return StageLosses(loss, zeros, zeros, torch.zeros(len(zs), dtype=torch.bool, device=loss.device))


def hsic_step_fn(
    depth: int,
    device: str,
    cuda_graphs: str = "auto",
    trivial: bool = False,
    leave_one_out: bool | None = None,
    preset: str = "paper_mlp",
    **overrides,
):
    """One stage holding every layer: factors once per batch, the batched step of all layers."""
    cfg, net, objective, batch = _setup(depth, leave_one_out, preset, **overrides)
    stage = StageStep(list(net.layers), TrivialObjective() if trivial else objective, cfg.optim, device, cuda_graphs)
    x = batch.x.to(device)
    factors = objective.kernel_factors(x, batch.y.to(device))
    return lambda: stage.train_step(x, factors)


def backprop_step_fn(depth: int, device: str, preset: str = "paper_mlp", **overrides):
    """Eager backprop of the same network and its head: forward, cross-entropy, backward, SGD step."""
    cfg, net, _, batch = _setup(depth, preset=preset, **overrides)
    model = build_model(net, 10).to(device)
    optimizer = make_sgd(model.parameters(), cfg.backprop)
    x, y = batch.x.to(device), batch.y.to(device)

    def step():
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def _fastest_rounds(fns: dict, steps: int, rounds: int) -> dict[str, float]:
    """ms per step of each function, timed in alternating rounds, so that a machine whose speed drifts (a
    shared VM) affects all alike; each takes its fastest round (noise only adds)."""
    for fn in fns.values():
        _timed(fn, 1, warmup=4)  # graph capture, allocator, momentum buffers
    per_round = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            per_round[name].append(_timed(fn, steps, warmup=0))
    return {name: 1e3 * min(times) for name, times in per_round.items()}


def step_comparison(depth: int, steps: int, device: str, cuda_graphs: str = "auto", rounds: int = 7) -> dict:
    """ms per step of HSIC (the paper's nHSIC and the leave-one-out fit), its floor and backprop."""
    fns = {
        "hsic": hsic_step_fn(depth, device, cuda_graphs),
        "hsic_loo": hsic_step_fn(depth, device, cuda_graphs, leave_one_out=True),
        "floor": hsic_step_fn(depth, device, cuda_graphs, trivial=True),
        "backprop": backprop_step_fn(depth, device),
    }
    ms = _fastest_rounds(fns, steps, rounds)
    return {
        "depth": depth,
        "layers": depth + 2,
        "hsic_ms": ms["hsic"],
        "floor_ms": ms["floor"],
        "backprop_ms": ms["backprop"],
        "hsic_over_floor": ms["hsic"] / ms["floor"],
        "hsic_loo_ms": ms["hsic_loo"],
        "loo_over_hsic": ms["hsic_loo"] / ms["hsic"],
        "hsic_over_backprop": ms["hsic"] / ms["backprop"],
    }


def conv_step_comparison(
    depth: int,
    width: int,
    steps: int,
    device: str,
    views: Sequence[int | None],
    cuda_graphs: str = "auto",
    rounds: int = 7,
    preset: str = "paper_mlp",
) -> dict:
    """ms per step of the plain conv net's HSIC step with each layer's kernel on each of `views` (None: the full
    output, else hsic.max_kernel_features), against its floor and backprop; the net's other settings `preset`'s."""
    net_fields = {"model.arch": "conv", "model.width": width}
    names = {view: _view_name(view) for view in views}
    fns = {
        # NULL: an override that sets the field to null; a plain None would leave the default.
        f"hsic_{name}": hsic_step_fn(
            depth,
            device,
            cuda_graphs,
            preset=preset,
            **net_fields,
            **{"hsic.max_kernel_features": NULL if view is None else view},
        )
        for view, name in names.items()
    }
    fns["floor"] = hsic_step_fn(depth, device, cuda_graphs, trivial=True, preset=preset, **net_fields)
    fns["backprop"] = backprop_step_fn(depth, device, preset, **net_fields)
    ms = _fastest_rounds(fns, steps, rounds)
    row = {"depth": depth, "width": width, "layers": depth + 2, "floor_ms": ms["floor"], "backprop_ms": ms["backprop"]}
    for name in names.values():
        row[f"hsic_{name}_ms"] = ms[f"hsic_{name}"]
        row[f"hsic_{name}_ms_per_layer"] = ms[f"hsic_{name}"] / (depth + 2)
        row[f"{name}_over_floor"] = ms[f"hsic_{name}"] / ms["floor"]
    return row


def _view_name(view: int | None) -> str:
    return "full" if view is None else f"pooled{view}"


def print_conv_steps(args, results: dict) -> None:
    print(
        f"## ms per training step: plain conv net (width {args.width}, {args.preset}'s other settings), every "
        "layer in one stage\n"
    )
    names = [_view_name(view) for view in args.kernel_views]
    print(
        "| depth | layers | "
        + "".join(f"HSIC {name} ms (per layer) | " for name in names)
        + "floor ms | "
        + "".join(f"{name} / floor | " for name in names)
        + "backprop ms |"
    )
    print("|---" * (4 + 2 * len(names)) + "|")
    for depth in args.depths:
        row = conv_step_comparison(
            depth, args.width, args.steps, args.device, args.kernel_views, args.cuda_graphs, preset=args.preset
        )
        results["conv_steps"].append(row)
        print(
            f"| {depth} | {row['layers']} | "
            + "".join(f"{row[f'hsic_{n}_ms']:.1f} ({row[f'hsic_{n}_ms_per_layer']:.1f}) | " for n in names)
            + f"{row['floor_ms']:.1f} | "
            + "".join(f"{row[f'{n}_over_floor']:.2f}x | " for n in names)
            + f"{row['backprop_ms']:.1f} |",
            flush=True,
        )


def reference_step_seconds(depth: int, steps: int, device: str) -> float:
    """The authors' schedule as the reference doc describes it, re-created for a like-for-like timing:
    for each layer i, a forward pass from the input up to layer i, the X and Y kernels rebuilt, the cca
    estimate by explicit inverses with one-sided centring, and an SGD optimizer rebuilt for the step."""
    cfg, net, _, batch = _setup(depth)
    net = net.to(device)
    x, y = batch.x.to(device), F.one_hot(batch.y, 10).float().to(device)
    m, sigma, beta, eps = x.shape[0], cfg.hsic.sigma, cfg.hsic.beta, cfg.hsic.eps
    h = torch.eye(m, device=device) - 1.0 / m
    eye = torch.eye(m, device=device)

    def nhsic(a, b):
        ka = gaussian_kernel(a, sigma) @ h
        kb = gaussian_kernel(b, sigma) @ h
        ra = ka @ torch.linalg.inv(ka + eps * m * eye)
        rb = kb @ torch.linalg.inv(kb + eps * m * eye)
        return torch.trace(ra @ rb)

    def step():
        for i, layer in enumerate(net.layers):
            opt = torch.optim.SGD(layer.parameters(), lr=cfg.optim.lr, momentum=0.9, weight_decay=1e-3)
            with torch.no_grad():
                h_in = x
                for below in list(net.layers)[:i]:
                    h_in = below(h_in)
            z = layer(h_in)
            loss = nhsic(z, x.flatten(1)) - beta * nhsic(z, y)
            opt.zero_grad()
            loss.backward()
            opt.step()

    return _timed(step, steps, warmup=1)


def estimator_ms(m: int, repeats: int, device: str) -> dict[str, dict[str, float]]:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(m, 1024, generator=g).to(device)
    y = F.one_hot(torch.randint(0, 10, (m,), generator=g), 10).float().to(device)
    estimators = {
        "cca": hsic_cca,
        "biased": hsic_biased,
        "cka": hsic_cka,
        "plausible": lambda kz, ky: plausible_loss(kz, ky, 2.0),
    }
    out = {}
    for name, fn in estimators.items():
        ky = gaussian_kernel(y, 6.0)

        def forward(fn=fn, ky=ky):
            fn(gaussian_kernel(z, 6.0), ky)

        def forward_backward(fn=fn, ky=ky):
            zz = z.detach().requires_grad_()
            fn(gaussian_kernel(zz, 6.0), ky).backward()

        out[name] = {
            "forward_ms": 1e3 * _timed(forward, repeats),
            "fwd_bwd_ms": 1e3 * _timed(forward_backward, repeats),
        }
    return out


def factor_ms(m: int, repeats: int, device: str) -> dict[str, float]:
    """ms for one batch's kernel factors: X's, Y's by the general m x m solve and in closed form,
    `HSICObjective.kernel_factors` as the training loop calls it (cca, sigma 6), and per batch of a group of
    AUTO_FACTOR_GROUP computed together (`group_kernel_factors`, train.factor_group)."""
    g = torch.Generator().manual_seed(0)
    xs = torch.rand(AUTO_FACTOR_GROUP, m, 784, generator=g).to(device)
    group_labels = torch.randint(0, 10, (AUTO_FACTOR_GROUP, m), generator=g).to(device)
    x, labels = xs[0], group_labels[0]
    dtype = torch.float64 if x.is_cuda else torch.float32  # as HSICObjective computes them there
    y = F.one_hot(labels, 10).to(dtype)
    objective = HSICObjective(HSICConfig(estimator="cca", sigma=6.0), 10)
    fns = {
        "x": lambda: cca_factor_ex(gaussian_kernel(x.to(dtype), 6.0)),
        "y_general": lambda: cca_factor_ex(gaussian_kernel(y, 6.0)),
        "y_closed_form": lambda: one_hot_cca_factor_ex(y, 6.0),
        "kernel_factors": lambda: objective.kernel_factors(x, labels),
        "group_kernel_factors": lambda: objective.group_kernel_factors(xs.unbind(), group_labels.unbind()),
    }
    times = {f"{name}_ms": 1e3 * _timed(fn, repeats) for name, fn in fns.items()}
    times["grouped_per_batch_ms"] = times.pop("group_kernel_factors_ms") / AUTO_FACTOR_GROUP
    return times


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depths", type=int, nargs="+", default=[5, 20, 50])
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024])
    p.add_argument("--steps", type=int, default=3, help="timed steps per round (7 alternating rounds per depth)")
    p.add_argument("--reference", action="store_true", help="also time the authors' schedule (slow at depth 50)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--cuda-graphs", choices=("auto", "on", "off"), default="auto")
    p.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    p.add_argument("--arch", choices=("mlp", "conv"), default="mlp", help="conv: time the plain conv net instead")
    p.add_argument("--width", type=int, default=16, help="channels of the conv net's first stage (--arch conv)")
    p.add_argument(
        "--preset",
        default="paper_mlp",
        choices=sorted(PRESETS),
        help="--arch conv: the preset whose other settings the conv net takes (deep_conv: as users run it)",
    )
    p.add_argument(
        "--kernel-views",
        type=parse_kernel_view,
        nargs="+",
        default=[None, build_config("deep_conv").hsic.max_kernel_features],
        metavar="VIEW",
        help="--arch conv: the layers' kernels on their full outputs (full) and average-pooled to at most N features "
        "(hsic.max_kernel_features); default: full and deep_conv's",
    )
    args = p.parse_args(argv)
    keep_freed_memory()  # as a run's processes do (benchmarks/memory_reuse.py times the difference)

    started = time.strftime("%Y-%m-%d %H:%M %Z")
    machine = f"{platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    machine += f", device {args.device}"
    if args.device.startswith("cuda"):
        machine += f" ({torch.cuda.get_device_name()}, cuda graphs {args.cuda_graphs})"
    print(f"# hsic-ray in-process benchmark ({machine}, torch {torch.__version__})\n")
    if args.arch == "conv":
        results: dict = {"machine": machine, "date": started, "conv_steps": []}
        print_conv_steps(args, results)
        return _write_json(args.json, results)
    print("## ms per training step: paper MLP (width 1024, batch 256, cca), every layer in one stage\n")
    header = (
        "| depth | layers | HSIC ms | floor ms | HSIC / floor | backprop ms | HSIC / backprop | leave-one-out ms "
        "(x HSIC) | authors s/step (their machine) |"
    )
    if args.reference:
        header += " reference schedule here s/step |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    results: dict = {"machine": machine, "date": started, "steps": [], "estimators": {}}
    for depth in args.depths:
        row = step_comparison(depth, args.steps, args.device, args.cuda_graphs)
        line = (
            f"| {depth} | {row['layers']} | {row['hsic_ms']:.1f} | {row['floor_ms']:.1f} | "
            f"{row['hsic_over_floor']:.2f}x "
            f"| {row['backprop_ms']:.1f} | {row['hsic_over_backprop']:.2f}x | {row['hsic_loo_ms']:.1f} "
            f"({row['loo_over_hsic']:.2f}x) "
            f"| {AUTHORS_STEP_SECONDS.get(depth, '-')} |"
        )
        if args.reference:
            row["reference_seconds_per_step"] = ref = reference_step_seconds(
                depth, max(1, args.steps // 2), args.device
            )
            line += f" {ref:.3f} |"
        results["steps"].append(row)
        print(line, flush=True)

    print("\n## Estimators: one batch of 1024-wide activations against 10-class labels (kernels included)\n")
    print("| m | estimator | forward ms | forward+backward ms | authors' cca forward ms |")
    print("|---|---|---|---|---|")
    for m in args.sizes:
        timings = estimator_ms(m, repeats=10 if m <= 512 else 3, device=args.device)
        results["estimators"][m] = timings
        for name, t in timings.items():
            authors = AUTHORS_CCA_MS.get(m, "-") if name == "cca" else ""
            print(f"| {m} | {name} | {t['forward_ms']:.2f} | {t['fwd_bwd_ms']:.2f} | {authors} |", flush=True)

    print("\n## Kernel factors of one batch: 784-pixel inputs, 10-class labels (cca, sigma 6)\n")
    print(
        "| m | X's ms | Y's ms, m x m solve | Y's ms, closed form | kernel_factors ms (both) "
        f"| per batch, {AUTO_FACTOR_GROUP} batches together (train.factor_group) |"
    )
    print("|---|---|---|---|---|---|")
    results["factors"] = {}
    for m in args.sizes:
        t = results["factors"][m] = factor_ms(m, repeats=20 if m <= 512 else 5, device=args.device)
        print(
            f"| {m} | {t['x_ms']:.2f} | {t['y_general_ms']:.2f} | {t['y_closed_form_ms']:.2f} | "
            f"{t['kernel_factors_ms']:.2f} | {t['grouped_per_batch_ms']:.2f} |",
            flush=True,
        )
    return _write_json(args.json, results)


def _write_json(path: str | None, results: dict) -> dict:
    if path:
        with open(path, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()

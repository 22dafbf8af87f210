"""How a finished run's layers hold the labels, layer by layer: the diagnostics behind `hsic.leave_one_out`.

    python benchmarks/layer_geometry.py RUN_DIR --data ../shared/datasets/fashion-mnist-dev.npz [--every 5]

For every `--every`-th layer (and the last two), on the first `--samples` training images, prints:
* participation ratio: (sum of the feature covariance's eigenvalues)^2 / (sum of their squares), the number
  of dimensions the layer's output effectively spreads over;
* between / within: the class means' scatter over the scatter around them (what a linear readout needs);
* nHSIC(Z, Y) on one training batch (the run's batch size), in-sample (the paper's cca) and leave-one-out.

A net trained on the paper's objective keeps its in-sample nHSIC(Z, Y) flat over depth while its output
spreads over more dimensions and its classes blur; the leave-one-out figure falls with them.
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from hsic_ray.config import DataConfig
from hsic_ray.data import load_dataset, to_tensor
from hsic_ray.objective import HSICObjective
from hsic_ray.run.model_io import load_model


def participation_ratio(z: torch.Tensor) -> float:
    centred = z - z.mean(0)
    eigenvalues = torch.linalg.eigvalsh(centred.T @ centred / len(z)).clamp_min(0)
    return float(eigenvalues.sum() ** 2 / eigenvalues.square().sum())


def between_over_within(z: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    means = torch.stack([z[labels == c].mean(0) for c in range(num_classes)])
    between = (means - z.mean(0)).square().sum(1).mean()
    within = (z - means[labels]).square().sum(1).mean()
    return float(between / within)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a finished run's directory (with model.pt)")
    p.add_argument("--data", default="../shared/datasets/fashion-mnist-dev.npz", help="npz with the run's splits")
    p.add_argument("--samples", type=int, default=3000, help="training images the geometry is measured on")
    p.add_argument("--every", type=int, default=5, help="print every N-th layer (and the last two)")
    args = p.parse_args(argv)
    model = load_model(args.run).eval()
    cfg = model.config
    data = load_dataset(DataConfig(source=f"npz:{args.data}"))
    x = to_tensor(data.x_train[: args.samples]).double()
    labels = torch.as_tensor(data.y_train[: args.samples]).long()
    batch = cfg.train.batch_size
    objectives = {
        name: HSICObjective(dataclasses.replace(cfg.hsic, leave_one_out=loo), data.num_classes)
        for name, loo in (("in-sample", False), ("left-out", True))
    }
    factors = objectives["in-sample"].kernel_factors(x[:batch].flatten(1), labels[:batch])
    layers = model.network.double().layers
    print("layer  participation  between/within  nHSIC(Z,Y) in-sample  left-out")
    z = x
    with torch.no_grad():
        for i, layer in enumerate(layers):
            z = layer(z)
            if i % args.every and i < len(layers) - 2:
                continue
            dependence = {
                name: float(o.stage_losses([z[:batch]], factors).nhsic_zy[0]) for name, o in objectives.items()
            }
            print(
                f"{i + 1:5d}  {participation_ratio(z):13.1f}  {between_over_within(z, labels, data.num_classes):14.3f}"
                f"  {dependence['in-sample']:20.2f}  {dependence['left-out']:8.2f}"
            )


if __name__ == "__main__":
    main()

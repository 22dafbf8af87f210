"""Where an unformatted net's accuracy is decided: checks on a finished run's `model.pt`.

    python benchmarks/readout_check.py RUN_DIR --data ../shared/datasets/fashion-mnist-dev.npz

Prints, for the run's network on the npz's splits:
* the unformatted accuracy read with BatchNorm's running statistics (as hsic-ray evaluates) and with each
  test batch's own statistics (as the HSIC-bottleneck authors' code reads its output);
* the format head's ceiling: linear heads on the last layer's outputs trained longer, faster and on
  standardised features than the preset's head;
* the authors' one-sided centring (K H) against ours (H K H) in the cca estimator: the largest difference in
  loss and gradient on one batch of the training split, in float64.
"""

from __future__ import annotations

import argparse
import copy

import numpy as np
import torch
from torch.nn import functional as F

from hsic_ray import evaluation
from hsic_ray.config import DataConfig
from hsic_ray.data import load_dataset, to_tensor
from hsic_ray.run.model_io import load_model

BATCH = 256


def outputs(network, x: np.ndarray, batch_statistics: bool) -> torch.Tensor:
    network = copy.deepcopy(network).train(batch_statistics)  # train mode normalises with each batch's statistics
    with torch.no_grad():
        return torch.cat([network(to_tensor(x[i : i + BATCH])) for i in range(0, len(x), BATCH)])


def head_accuracy(train, y_train, test, y_test, lr: float, epochs: int, standardise: bool) -> float:
    if standardise:
        mean, std = train.mean(0), train.std(0) + 1e-6
        train, test = (train - mean) / std, (test - mean) / std
    torch.manual_seed(0)
    head = torch.nn.Linear(train.shape[1], int(y_train.max()) + 1)
    optimizer = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9)
    order = np.random.default_rng(0)
    for _ in range(epochs):
        for idx in torch.from_numpy(order.permutation(len(train))).split(BATCH):
            loss = F.cross_entropy(head(train[idx]), y_train[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        return evaluation.accuracy(head(test), y_test)


def cca_dependence(z: torch.Tensor, v: torch.Tensor, sigma: float, two_sided: bool, eps: float = 1e-5) -> torch.Tensor:
    """nHSIC(Z, V) with the Gaussian kernel and the cca form, centred on both sides or (the authors') one."""
    m = z.shape[0]
    eye = torch.eye(m, dtype=z.dtype)
    centre = eye - 1.0 / m

    def normalised(w):
        kernel = torch.exp(-torch.cdist(w, w).square() / (2 * sigma**2 * w.shape[1]))
        centred = centre @ kernel @ centre if two_sided else kernel @ centre
        return centred @ torch.linalg.inv(centred + eps * m * eye)

    return (normalised(z) * normalised(v).T).sum()


def centring_difference(network, x: np.ndarray, labels: np.ndarray, sigma: float, beta: float) -> tuple[float, float]:
    """The largest |loss| and |gradient| difference between the two centrings, for the first layer's output."""
    x = to_tensor(x[:BATCH]).flatten(1).double()
    y = F.one_hot(torch.as_tensor(labels[:BATCH]).long()).double()
    first = copy.deepcopy(network.layers[0]).double().train()
    results = []
    for two_sided in (True, False):
        z = first(x).detach().requires_grad_()
        loss = cca_dependence(z, x, sigma, two_sided) - beta * cca_dependence(z, y, sigma, two_sided)
        loss.backward()
        results.append((loss.detach(), z.grad))
    (loss_a, grad_a), (loss_b, grad_b) = results
    return float((loss_a - loss_b).abs()), float((grad_a - grad_b).abs().max() / grad_a.abs().max())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a finished run's directory (with model.pt)")
    p.add_argument("--data", default="../shared/datasets/fashion-mnist-dev.npz", help="npz with the run's splits")
    args = p.parse_args(argv)
    model = load_model(args.run)
    data = load_dataset(DataConfig(source=f"npz:{args.data}"))
    y_train, y_test = torch.as_tensor(data.y_train).long(), torch.as_tensor(data.y_test).long()
    train = outputs(model.network, data.x_train, batch_statistics=False)
    for batch_statistics in (False, True):
        test = outputs(model.network, data.x_test, batch_statistics)
        accuracy = evaluation.unformatted_accuracy(train, data.y_train, test, data.y_test, data.num_classes)
        print(f"unformatted, {'test-batch' if batch_statistics else 'running'} statistics: {accuracy:.2f}%")
    test = outputs(model.network, data.x_test, batch_statistics=False)
    for lr, epochs, standardise in ((0.005, 5, False), (0.005, 40, False), (0.05, 5, False), (0.05, 20, True)):
        accuracy = head_accuracy(train, y_train, test, y_test, lr, epochs, standardise)
        print(f"head lr {lr}, {epochs} epochs{', standardised' if standardise else ''}: {accuracy:.2f}%")
    hsic = model.config.hsic
    loss_gap, grad_gap = centring_difference(model.network, data.x_train, data.y_train, hsic.sigma, hsic.beta)
    print(
        f"one-sided against two-sided centring, first layer, float64: |loss difference| {loss_gap:.1e}, "
        f"largest gradient difference {grad_gap:.1e} of the largest gradient"
    )


if __name__ == "__main__":
    main()

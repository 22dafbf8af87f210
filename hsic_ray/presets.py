"""Named starting configs (`--preset`), built from one base so that each says only where it differs, and the
overrides of `--smoke-test`.

A preset is built for its data source, since its beta depends on the dataset (`config.dataset_family`).
docs/configuration.md tabulates them; docs/results.md holds the measurements behind their choices.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from hsic_ray.config import (
    DataConfig,
    ExperimentConfig,
    HeadConfig,
    HSICConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
    dataset_family,
)

# What --smoke-test sets (flags given beside it still win): a tiny network for a few steps, to check in
# seconds that data, cluster and output work before a long run. A smoke sweep takes these too.
SMOKE_TEST: dict[str, Any] = {
    "model.depth": 1,
    "model.width": 32,
    "train.epochs": 1,
    "train.max_steps": 4,
    "head.epochs": 1,
    "train.eval_samples": 64,
    "train.log_every": 2,
}


def _preset(
    name: str,
    source: str,
    family: str | None,
    betas: dict[str, float],
    model: ModelConfig,
    hsic: HSICConfig,
    optim: OptimConfig,
    backprop: OptimConfig,
    batch_size: int,
) -> ExperimentConfig:
    """What every preset shares: its data, beta by dataset family (`betas`), 5 epochs, the format head."""
    return ExperimentConfig(
        preset=name,
        data=DataConfig(source=source, family=family),
        model=model,
        hsic=dataclasses.replace(hsic, beta=betas[dataset_family(source, family)]),
        optim=optim,
        head=HeadConfig(epochs=5, lr=0.005),
        train=TrainConfig(batch_size=batch_size, epochs=5),
        backprop=backprop,
    )


def paper_mlp(source: str = "mnist-sample", family: str | None = None) -> ExperimentConfig:
    """The unformatted 5 x 1024 MLP of the paper's Fig. 3/4, last layer 10 wide."""
    return _preset(
        "paper_mlp",
        source,
        family,
        {"mnist": 200.0, "fashion-mnist": 1000.0, "cifar10": 2500.0},
        ModelConfig(arch="mlp", depth=5, width=1024, last_width=10, activation="relu"),
        HSICConfig(estimator="cca", sigma=6.0),
        # The authors' lr is 1e-3 with an SGD momentum that never acted (their optimizer was rebuilt every
        # step). With momentum that persists, 1e-4 takes the same effective step, lr / (1 - momentum).
        # Annealed to 0 over the run (not in the paper), as is backprop's: the last steps settle instead of
        # jittering (docs/results.md, "paper_mlp against the authors' code").
        optim=OptimConfig(lr=1e-4, momentum=0.9, schedule="cosine"),
        backprop=OptimConfig(lr=0.05, schedule="cosine"),
        batch_size=256,
    )


def paper_resconv(source: str = "mnist-sample", family: str | None = None) -> ExperimentConfig:
    """The residual conv net of the paper's Fig. 7: 5 blocks of 64 channels, dense to 512, format head."""
    return _preset(
        "paper_resconv",
        source,
        family,
        {"mnist": 200.0, "fashion-mnist": 500.0, "cifar10": 500.0},
        ModelConfig(arch="resconv", depth=5, width=64, last_width=512, activation="relu"),
        HSICConfig(estimator="cca", sigma=5.0),
        optim=OptimConfig(lr=0.01),
        backprop=OptimConfig(lr=0.01),
        batch_size=512,
    )


def deep_mlp(source: str = "mnist-sample", family: str | None = None) -> ExperimentConfig:
    """A deep MLP without skip connections, sized to train on the bundled digits in minutes on 2 cores."""
    return _preset(
        "deep_mlp",
        source,
        family,
        {"mnist": 2500.0, "fashion-mnist": 1000.0, "cifar10": 500.0},
        # Depth-robust choices (docs/results.md, "What makes depth cheap"): elu has no dead units to drop
        # information layer after layer, batches of 512 give steadier kernel estimates, and orthogonal weights
        # hold a deep net over longer training. Elu is also what lets the backprop baseline train deep nets.
        ModelConfig(arch="mlp", depth=20, width=256, last_width=10, activation="elu", init="orthogonal"),
        # Not the paper's objective: each layer's nHSIC is scored as a leave-one-out fit. In-sample, a layer gains
        # by spreading its output over dimensions that fit only its batch, and many layers in a row pile that up
        # until the labels' linear readout fades (docs/results.md, "Depth on Fashion-MNIST").
        HSICConfig(estimator="cca", sigma=6.0, leave_one_out=True),
        # The authors' 1e-3 without momentum (see paper_mlp), annealed: deep nets gain most from it
        # (docs/results.md, "What was tried at depth 50").
        optim=OptimConfig(lr=1e-4, momentum=0.9, schedule="cosine"),
        backprop=OptimConfig(lr=0.01, schedule="cosine"),
        batch_size=512,
    )


def deep_conv(source: str = "mnist-sample", family: str | None = None) -> ExperimentConfig:
    """A deep plain conv net, without skip connections: 3x3 convs in three stages of 16 / 32 / 64 channels."""
    cfg = deep_mlp(source, family)
    betas = {"mnist": 250.0, "fashion-mnist": 100.0, "cifar10": 50.0}
    return dataclasses.replace(
        cfg,
        preset="deep_conv",
        # deep_mlp's depth-robust choices, on conv layers. The format head reads a 512-wide last layer, as the
        # paper's residual conv net has: a 10-wide one held far less than the conv layers before it, and a
        # 128-wide one held less than 512 (docs/results.md, "The last layer's width"). That
        # layer reads the last conv map pooled to 4 x 4, not to one average per channel: HSIC's conv features
        # are not trained to be read by a global average, and where in the image they fire carries the class.
        # Through 56 random 3x3 convs an untrained net loses the image: identity weights start every depth
        # from the stem's output, and smaller steps keep each layer's input steady while the layers below it
        # train (docs/results.md, "Deep plain conv nets").
        model=ModelConfig(
            arch="conv", depth=20, width=16, pool_grid=4, last_width=512, activation="elu", init="identity"
        ),
        # A tenth of deep_mlp's beta: the input term, nHSIC(Z, X), keeps a layer from dropping what the batch's
        # labels do not need, and through dozens of conv layers that loss adds up (docs/results.md, "beta at
        # every depth").
        # Each layer's kernel reads its conv map average-pooled to at most 4096 features (2 x 2 windows on the
        # large early maps): as accurate as the whole map on both datasets measured, for a cheaper
        # step. Coarser views were faster still but not as accurate everywhere (docs/results.md, "The kernel on
        # a pooled view").
        hsic=dataclasses.replace(cfg.hsic, beta=betas[dataset_family(source, family)], max_kernel_features=4096),
        optim=dataclasses.replace(cfg.optim, lr=3e-5),
        # Probes read each conv map pooled to 512 features, not 2048: their fit grows with the square, and with
        # dozens of conv layers it took longer than the training it watched (docs/results.md, "Linear probes'
        # cost").
        train=dataclasses.replace(cfg.train, batch_size=256, probe_features=512),
    )


PRESETS: dict[str, Callable[[str, str | None], ExperimentConfig]] = {
    "paper_mlp": paper_mlp,
    "paper_resconv": paper_resconv,
    "deep_mlp": deep_mlp,
    "deep_conv": deep_conv,
}

"""Networks as lists of independently trainable layers, plus the linear format head.

HSIC training never passes a gradient between layers, so a network here is just an ordered list of
modules with known input and output shapes: any contiguous slice can be trained in another process.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.func import functional_call

from hsic_ray.config import HSICConfig, ModelConfig, check_setting
from hsic_ray.objective import kernel_features

Shape = tuple[int, ...]

# Above this, a meta-device layer's shapes come from the meta device itself: a two-sample pass over stand-ins
# would cost a page fault per 4 KiB of weights.
MAX_STAND_IN_BYTES = 1 << 30
_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "elu": nn.ELU}


def dense_block(in_features: int, out_features: int, activation: str, flatten: bool = False) -> nn.Sequential:
    """Linear -> BatchNorm1d(affine=False) -> activation, as in the authors' MLP."""
    parts: list[nn.Module] = [nn.Flatten()] if flatten else []
    parts += [nn.Linear(in_features, out_features), nn.BatchNorm1d(out_features, affine=False)]
    parts.append(_ACTIVATIONS[activation]())
    return nn.Sequential(*parts)


class ResidualBlock(nn.Module):
    """act(BN(act(BN(conv(x))) + x)): the residual unit of the paper's Fig. 7."""

    def __init__(self, channels: int, activation: str, kernel_size: int = 5):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2)
        self.bn_inner = nn.BatchNorm2d(channels, affine=False)
        self.bn_outer = nn.BatchNorm2d(channels, affine=False)
        self.act = _ACTIVATIONS[activation]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.bn_inner(self.conv(x)))
        return self.act(self.bn_outer(y + x))


class LayerwiseNet(nn.Module):
    """An ordered list of layers; `shapes[i]` is layer i's input shape, `shapes[-1]` the output shape."""

    def __init__(self, layers: Sequence[nn.Module], shapes: Sequence[Shape]):
        super().__init__()
        if len(shapes) != len(layers) + 1:
            raise ValueError(f"need {len(layers) + 1} shapes for {len(layers)} layers, got {len(shapes)}")
        self.layers = nn.ModuleList(layers)
        self.shapes = [tuple(s) for s in shapes]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x

    def __len__(self) -> int:
        return len(self.layers)

    def slice(self, start: int, stop: int) -> LayerwiseNet:
        """Layers [start, stop) as a network of their own (sharing the modules)."""
        return LayerwiseNet(list(self.layers)[start:stop], self.shapes[start : stop + 1])

    @property
    def output_features(self) -> int:
        return math.prod(self.shapes[-1])


def _infer_shapes(layers: Sequence[nn.Module], input_shape: Shape) -> list[Shape]:
    # Eval mode so BatchNorm accepts a tiny batch and its running statistics stay untouched.
    shapes = [tuple(input_shape)]
    with torch.no_grad():
        for layer in layers:
            was_training = layer.training
            shapes.append(_output_shape(layer.eval(), shapes[-1]))
            layer.train(was_training)
    return shapes


def _output_shape(layer: nn.Module, input_shape: Shape) -> Shape:
    """A layer's output shape from a two-sample forward pass. A layer built on the meta device (to count
    parameters) runs on uninitialised CPU stand-ins for its tensors: meta-device ops import torch's
    decomposition library, two seconds of every job's start, while a stand-in's large pages are fresh and
    reading them does not make them resident."""
    x = torch.zeros(2, *input_shape, device="cpu")
    tensors = {**dict(layer.named_parameters()), **dict(layer.named_buffers())}
    if any(t.is_meta for t in tensors.values()):
        if sum(t.nbytes for t in tensors.values()) > MAX_STAND_IN_BYTES:
            return tuple(layer(x.to("meta")).shape[1:])
        tensors = {name: torch.empty(t.shape, dtype=t.dtype, device="cpu") for name, t in tensors.items()}
    return tuple(functional_call(layer, tensors, (x,)).shape[1:])


def build_mlp(cfg: ModelConfig, input_shape: Shape) -> LayerwiseNet:
    """input -> width, `depth` blocks width -> width, width -> last_width: depth + 2 layers."""
    in_features = math.prod(input_shape)
    layers = [dense_block(in_features, cfg.width, cfg.activation, flatten=True)]
    layers += [dense_block(cfg.width, cfg.width, cfg.activation) for _ in range(cfg.depth)]
    layers.append(dense_block(cfg.width, cfg.last_width, cfg.activation))
    return LayerwiseNet(layers, _infer_shapes(layers, input_shape))


def build_resconv(cfg: ModelConfig, input_shape: Shape) -> LayerwiseNet:
    """5x5 stride-2 conv, `depth` residual blocks of `width` channels, then dense to last_width."""
    channels_in, height, width = input_shape
    stem = nn.Sequential(
        nn.Conv2d(channels_in, cfg.width, 5, stride=2, padding=2),
        nn.BatchNorm2d(cfg.width, affine=False),
        _ACTIVATIONS[cfg.activation](),
    )
    layers: list[nn.Module] = [stem] + [ResidualBlock(cfg.width, cfg.activation) for _ in range(cfg.depth)]
    flat = math.prod(_infer_shapes(layers, input_shape)[-1])
    layers.append(dense_block(flat, cfg.last_width, cfg.activation, flatten=True))
    return LayerwiseNet(layers, _infer_shapes(layers, input_shape))


def conv_block(in_channels: int, out_channels: int, activation: str, stride: int = 1) -> nn.Sequential:
    """3x3 conv -> BatchNorm2d(affine=False) -> activation; padding keeps the size at stride 1."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1),
        nn.BatchNorm2d(out_channels, affine=False),
        _ACTIVATIONS[activation](),
    )


class SkipConvBlock(nn.Module):
    """`conv_block` with a skip connection: activation(BatchNorm(conv(x)) + shortcut(x)), the shortcut the
    identity, or a 1x1 conv and BatchNorm where the block changes the size or the channels."""

    def __init__(self, in_channels: int, out_channels: int, activation: str, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1)
        self.bn = nn.BatchNorm2d(out_channels, affine=False)
        self.act = _ACTIVATIONS[activation]()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride), nn.BatchNorm2d(out_channels, affine=False)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)) + self.shortcut(x))


def stage_depths(depth: int, stages: int = 3) -> list[int]:
    """`depth` layers split over `stages` as evenly as possible, the earlier stages taking the remainder."""
    return [depth // stages + (1 if s < depth % stages else 0) for s in range(stages)]


def build_conv(cfg: ModelConfig, input_shape: Shape) -> LayerwiseNet:
    """A plain conv net (no skip connections), He et al. (2016)'s CIFAR plain net: a 3x3 stem to `width`
    channels, `depth` 3x3 conv blocks in three stages of width, 2 width and 4 width channels (the first
    block of stages 2 and 3 at stride 2), then average pooling to a `pool_grid` x `pool_grid` grid (1: global)
    and dense to last_width: depth + 2 layers, each its own HSIC layer. With `skips`, every conv block after the
    stem is a `SkipConvBlock`."""
    block = SkipConvBlock if cfg.skips else conv_block
    layers: list[nn.Module] = [conv_block(input_shape[0], cfg.width, cfg.activation)]
    channels = cfg.width
    for stage, blocks in enumerate(stage_depths(cfg.depth)):
        for index in range(blocks):
            out_channels = cfg.width * 2**stage
            stride = 2 if stage > 0 and index == 0 else 1
            layers.append(block(channels, out_channels, cfg.activation, stride))
            channels = out_channels
    shapes = _infer_shapes(layers, input_shape)
    check_setting(
        cfg.pool_grid <= min(shapes[-1][1:]),
        "model.pool_grid",
        cfg.pool_grid,
        f"at most the last conv map's side ({shapes[-1][1]} x {shapes[-1][2]} for this data and depth)",
    )
    head = dense_block(channels * cfg.pool_grid**2, cfg.last_width, cfg.activation)
    layers.append(nn.Sequential(nn.AdaptiveAvgPool2d(cfg.pool_grid), nn.Flatten(), *head))
    return LayerwiseNet(layers, shapes + _infer_shapes(layers[-1:], shapes[-1])[1:])


def build_network(cfg: ModelConfig, input_shape: Shape) -> LayerwiseNet:
    builders = {"mlp": build_mlp, "resconv": build_resconv, "conv": build_conv}
    net = builders[cfg.arch](cfg, tuple(input_shape))
    if cfg.init in ("orthogonal", "identity"):
        orthogonal_init_(net)
    if cfg.init == "identity":
        identity_init_(net)
    return net


def orthogonal_init_(net: nn.Module) -> None:
    """Orthonormal rows (or columns) for every Linear and Conv2d weight, zero biases."""
    for module in net.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.orthogonal_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


def identity_init_(net: LayerwiseNet) -> None:
    """Every layer that maps its input's shape to itself starts as the identity: its one Linear or Conv2d
    copies its input (a Dirac kernel for a conv). Through BatchNorm and an invertible activation such a layer
    loses nothing, so however deep the net, each layer's input starts as informative as the stem's output and
    the deep layers' local losses train from the first step; a randomly initialised plain net's deep layers
    start from inputs mixed through every layer below. Layers that change the shape keep their init."""
    for i, layer in enumerate(net.layers):
        weighted = [m for m in layer.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        if net.shapes[i] != net.shapes[i + 1] or len(weighted) != 1:
            continue
        module = weighted[0]
        with torch.no_grad():
            (nn.init.dirac_ if isinstance(module, nn.Conv2d) else nn.init.eye_)(module.weight)
            if module.bias is not None:
                module.bias.zero_()


def build_head(in_features: int, num_classes: int) -> nn.Sequential:
    """The format head: one linear layer from the (flattened) network output to class logits."""
    return nn.Sequential(nn.Flatten(), nn.Linear(in_features, num_classes))


def forward_macs(layer: nn.Module, input_shape: Shape) -> int:
    """Multiply-accumulates of one sample's forward pass through `layer`'s Linear and Conv2d modules."""
    total = 0

    def count(module: nn.Module, _inputs, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Linear):
            total += module.in_features * module.out_features
        elif isinstance(module, nn.Conv2d):
            per_output = module.in_channels // module.groups * math.prod(module.kernel_size)
            total += per_output * math.prod(output.shape[1:])

    hooks = [m.register_forward_hook(count) for m in layer.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    was_training = layer.training
    try:
        with torch.no_grad():
            layer.eval()(torch.zeros(1, *input_shape))
    finally:
        layer.train(was_training)
        for hook in hooks:
            hook.remove()
    return total


def layer_step_costs(
    net: LayerwiseNet, batch_size: int, max_kernel_features: int | None = HSICConfig.max_kernel_features
) -> list[float]:
    """Estimated FLOPs of one local HSIC step of each layer on a batch of m samples.

    Forward and backward of the layer (about 3x the forward's 2 * MACs), plus the layer's kernel on its
    m x d view (forward and backward; d after pooling to `max_kernel_features`, `hsic.max_kernel_features`) and
    the m x m Cholesky solve of its estimator factor.
    """
    m = batch_size
    costs = []
    for i, layer in enumerate(net.layers):
        dense = 6.0 * m * forward_macs(layer, net.shapes[i])
        kernel = 6.0 * m * m * kernel_features(net.shapes[i + 1], max_kernel_features)
        solve = 3.0 * m**3
        costs.append(dense + kernel + solve)
    return costs

import pytest
import torch
from torch import nn

from hsic_ray.config import ACTIVATIONS, ModelConfig
from hsic_ray.models import LayerwiseNet, build_head, build_network


@pytest.mark.parametrize("depth", [1, 5])
def test_mlp_has_input_hidden_and_output_blocks(depth):
    net = build_network(ModelConfig(arch="mlp", depth=depth, width=32, last_width=10), (1, 28, 28))
    assert len(net) == depth + 2
    assert net.shapes == [(1, 28, 28), (32,)] + [(32,)] * depth + [(10,)]
    first = net.layers[0]
    assert isinstance(first[0], nn.Flatten) and first[1].in_features == 784
    for layer in net.layers:
        bn = [m for m in layer.modules() if isinstance(m, nn.BatchNorm1d)]
        assert len(bn) == 1 and not bn[0].affine
    out = net(torch.rand(4, 1, 28, 28))
    assert out.shape == (4, 10)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_mlp_activation_is_applied(activation):
    net = build_network(ModelConfig(depth=1, width=8, last_width=4, activation=activation), (1, 4, 4))
    names = {type(m).__name__.lower() for m in net.modules()}
    assert activation in names


@pytest.mark.parametrize("arch, width", [("mlp", 32), ("resconv", 8)])
def test_orthogonal_init_gives_orthonormal_weights_and_zero_biases(arch, width):
    cfg = ModelConfig(arch=arch, depth=2, width=width, last_width=10, init="orthogonal")
    weights = [m for m in build_network(cfg, (1, 28, 28)).modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert len(weights) == 4
    for module in weights:
        w = module.weight.detach().flatten(1)
        gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w  # rows or columns, whichever are fewer
        assert torch.allclose(gram, torch.eye(gram.shape[0]), atol=1e-5)
        assert torch.count_nonzero(module.bias) == 0
    default = build_network(ModelConfig(arch=arch, depth=2, width=width, last_width=10), (1, 28, 28))
    assert all(torch.count_nonzero(m.bias) > 0 for m in default.modules() if isinstance(m, nn.Linear))


def test_orthogonal_elu_net_keeps_many_directions_of_its_input_at_depth_50():
    # What --init orthogonal is for: an untrained 50-block net does not squash its inputs onto a few
    # directions (PyTorch's default init does, so deep layers start from a degraded representation).
    torch.manual_seed(0)
    x = torch.rand(64, 1, 28, 28)

    def spread(init: str) -> float:
        torch.manual_seed(1)
        net = build_network(ModelConfig(depth=50, width=64, last_width=64, activation="elu", init=init), (1, 28, 28))
        with torch.no_grad():
            z = net(x)
        s = torch.linalg.svdvals(z - z.mean(dim=0))
        return (s[30] / s[0]).item()

    assert spread("orthogonal") > 2 * spread("default")


@pytest.mark.parametrize("input_shape, flat", [((1, 28, 28), 16 * 14 * 14), ((3, 32, 32), 16 * 16 * 16)])
def test_resconv_shapes_follow_the_stride_two_stem(input_shape, flat):
    net = build_network(ModelConfig(arch="resconv", depth=2, width=16, last_width=24), input_shape)
    assert len(net) == 4
    half = (16, input_shape[1] // 2, input_shape[2] // 2)
    assert net.shapes[1] == net.shapes[2] == net.shapes[3] == half
    assert net.shapes[-1] == (24,)
    assert net.layers[-1][1].in_features == flat
    assert net(torch.rand(3, *input_shape)).shape == (3, 24)


def test_residual_block_adds_its_input():
    net = build_network(ModelConfig(arch="resconv", depth=1, width=4, last_width=8), (1, 8, 8))
    block = net.layers[1].eval()
    x = torch.rand(2, 4, 4, 4)
    with torch.no_grad():
        block.conv.weight.zero_()
        block.conv.bias.zero_()
        # conv output 0 -> inner branch relu(BN(0)) = 0, so the block reduces to relu(BN(x)).
        expected = torch.relu(block.bn_outer(x))
        assert torch.allclose(block(x), expected)


def test_slice_shares_modules_and_keeps_shapes():
    net = build_network(ModelConfig(depth=3, width=16, last_width=10), (1, 8, 8))
    part = net.slice(1, 5)
    assert len(part) == 4
    assert part.shapes == net.shapes[1:6]
    assert part.layers[0] is net.layers[1]
    x = torch.rand(5, 1, 8, 8)
    net.eval()
    with torch.no_grad():
        assert torch.allclose(part(net.slice(0, 1)(x)), net(x))


def test_shape_inference_leaves_batchnorm_statistics_untouched():
    net = build_network(ModelConfig(depth=2, width=8, last_width=4), (1, 4, 4))
    for module in net.modules():
        if isinstance(module, nn.BatchNorm1d):
            assert int(module.num_batches_tracked) == 0
            assert torch.all(module.running_mean == 0)
        assert module.training


@pytest.mark.parametrize("arch, input_shape", [("mlp", (1, 28, 28)), ("resconv", (3, 32, 32))])
def test_a_meta_device_build_has_the_real_builds_shapes_and_parameter_count(arch, input_shape):
    cfg = ModelConfig(arch=arch, depth=2, width=16, last_width=24)
    real = build_network(cfg, input_shape)
    with torch.device("meta"):  # how check_memory counts a network's parameters without allocating it
        meta = build_network(cfg, input_shape)
    assert all(p.is_meta for p in meta.parameters())
    assert meta.shapes == real.shapes
    assert sum(p.numel() for p in meta.parameters()) == sum(p.numel() for p in real.parameters())


def test_a_meta_build_too_large_for_stand_ins_gets_its_shapes_from_the_meta_device():
    with torch.device("meta"):
        net = build_network(ModelConfig(depth=1, width=1_000_000, last_width=10), (1, 28, 28))  # 4 TB of weights
    assert net.shapes == [(1, 28, 28), (1_000_000,), (1_000_000,), (10,)]


def test_layerwise_net_rejects_wrong_shape_count():
    with pytest.raises(ValueError, match="need 3 shapes"):
        LayerwiseNet([nn.Identity(), nn.Identity()], [(1,), (1,)])


def test_head_maps_flattened_features_to_classes():
    head = build_head(12, 10)
    assert head(torch.rand(7, 3, 4)).shape == (7, 10)

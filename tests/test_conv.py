"""The plain conv net (model.arch=conv): its layers, its kernels' pooled view, its cost model, and real runs of it
in process, on the Ray pipeline and by backprop."""

import sys
from pathlib import Path

import pytest
import ray
import torch
from torch import nn

from hsic_ray.cli import HSIC_FLAGS, RUN_FLAGS, build_run_config
from hsic_ray.config import NULL, ConfigError, HSICConfig, ModelConfig, build_config
from hsic_ray.distributed.shutdown import shutdown
from hsic_ray.experiment import run_backprop, run_hsic
from hsic_ray.hsic import gaussian_kernel
from hsic_ray.models import build_network, forward_macs, layer_step_costs, stage_depths
from hsic_ray.objective import HSICObjective, kernel_features, kernel_pool, kernel_view

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs"))
import train_deep  # noqa: E402


def conv_net(depth=8, width=4, input_shape=(1, 28, 28), **fields):
    torch.manual_seed(0)
    return build_network(ModelConfig(arch="conv", depth=depth, width=width, last_width=10, **fields), input_shape)


@pytest.mark.parametrize("depth, split", [(1, [1, 0, 0]), (8, [3, 3, 2]), (20, [7, 7, 6]), (56, [19, 19, 18])])
def test_depth_splits_into_three_stages_as_evenly_as_possible(depth, split):
    assert stage_depths(depth) == split


def test_conv_net_has_a_stem_depth_conv_layers_in_three_stages_and_a_dense_layer():
    net = conv_net(depth=8, width=4)
    assert len(net) == 10
    c = [(4, 28, 28)] * 4 + [(8, 14, 14)] * 3 + [(16, 7, 7)] * 2
    assert net.shapes == [(1, 28, 28), *c, (10,)]
    convs = [layer[0] for layer in net.layers[:-1]]
    assert all(isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3) for conv in convs)
    assert [conv.stride[0] for conv in convs] == [1, 1, 1, 1, 2, 1, 1, 2, 1]
    norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(norms) == 10 and not any(n.affine for n in norms)
    assert net(torch.rand(3, 1, 28, 28)).shape == (3, 10)
    assert conv_net(depth=56, width=2).shapes[-2] == (8, 7, 7) and len(conv_net(depth=56, width=2)) == 58


def test_conv_net_has_no_skip_connections():
    # With one middle layer's conv zeroed, its output is constant, and so is everything above it: nothing
    # of the input goes round it (a residual block would pass it on).
    net = conv_net(depth=4, width=4).eval()
    with torch.no_grad():
        net.layers[2][0].weight.zero_()
        net.layers[2][0].bias.zero_()
        out = net(torch.rand(5, 1, 28, 28))
    assert torch.allclose(out, out[:1].expand_as(out))


def test_skips_add_each_conv_layers_input_back_and_keep_the_layers_and_shapes():
    plain, skipped = conv_net(depth=4, width=4), conv_net(depth=4, width=4, skips=True)
    assert len(skipped) == len(plain) and skipped.shapes == plain.shapes
    # The same zeroed conv as above: with its skip connection, the input still reaches the output.
    skipped.eval()
    with torch.no_grad():
        skipped.layers[2].conv.weight.zero_()
        skipped.layers[2].conv.bias.zero_()
        out = skipped(torch.rand(5, 1, 28, 28))
    assert not torch.allclose(out, out[:1].expand_as(out))
    # Where a stage halves the size and doubles the channels, the shortcut is a strided 1x1 projection.
    projections = [layer.shortcut[0] for layer in skipped.layers[1:-1] if not isinstance(layer.shortcut, nn.Identity)]
    assert [(conv.kernel_size, conv.stride) for conv in projections] == [((1, 1), (2, 2))] * 2


def test_skips_are_refused_outside_the_conv_net():
    with pytest.raises(ConfigError, match="model.skips"):
        build_config("deep_mlp", overrides={"model.skips": True})


def test_pool_grid_keeps_where_in_the_image_a_feature_fired():
    net = conv_net(depth=4, width=4, pool_grid=4)
    dense = next(m for m in net.layers[-1].modules() if isinstance(m, nn.Linear))
    assert dense.in_features == 16 * 4 * 4 and net.shapes[-1] == (10,)
    assert net(torch.rand(3, 1, 28, 28)).shape == (3, 10)
    # The last conv map mirrored left to right: global averages cannot tell the two apart, a 4 x 4 grid can.
    last_map = torch.rand(2, 16, 7, 7)
    mirrored = last_map.flip(-1)
    for grid, tells_apart in [(1, False), (4, True)]:
        pool = conv_net(depth=4, width=4, pool_grid=grid).layers[-1][0]
        assert torch.allclose(pool(last_map), pool(mirrored)) is not tells_apart


@pytest.mark.parametrize("arch, grid", [("mlp", 4), ("conv", 0), ("conv", -2)])
def test_pool_grid_is_refused_outside_the_conv_net_or_below_one(arch, grid):
    with pytest.raises(ConfigError, match="model.pool_grid"):
        build_config("deep_mlp", overrides={"model.arch": arch, "model.pool_grid": grid})


def test_a_pool_grid_finer_than_the_last_map_is_refused_naming_its_size():
    with pytest.raises(ConfigError, match=r"model.pool_grid=8 .* the last conv map's side \(7 x 7"):
        conv_net(depth=4, width=4, pool_grid=8)


def test_orthogonal_init_covers_the_conv_layers():
    for conv in [m for m in conv_net(init="orthogonal").modules() if isinstance(m, nn.Conv2d)]:
        w = conv.weight.detach().flatten(1)
        gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
        assert torch.allclose(gram, torch.eye(gram.shape[0]), atol=1e-5)
        assert torch.count_nonzero(conv.bias) == 0


@pytest.mark.parametrize("skips", [False, True])
def test_identity_init_starts_every_shape_keeping_conv_as_the_identity(skips):
    net = conv_net(depth=8, init="identity", skips=skips)
    kept, changed = 0, 0
    for i, layer in enumerate(net.layers[:-1]):
        conv = next(m for m in layer.modules() if isinstance(m, nn.Conv2d))
        z = torch.randn(3, *net.shapes[i])
        if net.shapes[i] == net.shapes[i + 1]:
            assert torch.allclose(conv(z), z, atol=1e-6)
            kept += 1
        else:  # the stem and the two stride-2 layers keep their orthogonal weights
            w = conv.weight.detach().flatten(1)
            gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
            assert torch.allclose(gram, torch.eye(gram.shape[0]), atol=1e-5)
            changed += 1
    assert (kept, changed) == (6, 3)
    # Through BatchNorm and elu, an untrained deep net of identity layers keeps its input's directions
    # as well as a shallow one does.
    x = torch.rand(64, 1, 28, 28)

    def spread(depth: int) -> float:
        deep = conv_net(depth=depth, width=4, init="identity", activation="elu").eval()
        with torch.no_grad():
            z = deep.slice(0, 1 + depth // 3)(x).flatten(1)  # the first stage: same shape throughout
        s = torch.linalg.svdvals(z - z.mean(dim=0))
        return (s[30] / s[0]).item()

    assert spread(56) == pytest.approx(spread(8), rel=0.05)


def test_kernel_view_pools_only_conv_maps_wider_than_the_bound():
    flat = torch.randn(8, 1024)
    assert kernel_view(flat, 512) is flat  # flat outputs (every mlp layer) are never touched
    small = torch.randn(8, 16, 7, 7)
    assert kernel_view(small, 2048) is small
    big = torch.randn(8, 16, 28, 28)
    assert kernel_view(big, None) is big
    pooled = kernel_view(big, 2048)
    assert pooled[0].numel() == kernel_features((16, 28, 28), 2048) <= 2048
    assert pooled[0].numel() > 2048 // 4  # the finest grid that fits, not a coarser one
    # Every window's mean: the last row and column of windows are cut off at the map's edge.
    assert torch.allclose(pooled[:, :, 0, 0], big[:, :, :3, :3].mean(dim=(2, 3)), atol=1e-6)
    assert torch.allclose(pooled[:, :, -1, -1], big[:, :, 27:, 27:].mean(dim=(2, 3)), atol=1e-6)


def test_a_map_smooth_within_windows_has_the_same_kernel_on_its_pooled_view():
    # Average pooling keeps each smooth difference's per-feature size, which the bandwidth is scaled by.
    coarse = torch.randn(16, 8, 4, 4)
    smooth = coarse.repeat_interleave(7, dim=2).repeat_interleave(7, dim=3)  # 8 x 28 x 28, constant on 7 x 7
    assert kernel_features(smooth.shape[1:], 128) == 128
    full, pooled = gaussian_kernel(smooth, 2.0), gaussian_kernel(kernel_view(smooth, 128), 2.0)
    assert torch.allclose(full, pooled, atol=1e-5)
    noisy = smooth + torch.randn_like(smooth)
    assert not torch.allclose(gaussian_kernel(noisy, 2.0), gaussian_kernel(kernel_view(noisy, 128), 2.0), atol=1e-3)


def test_the_objective_takes_kernels_on_the_view_the_config_asks_for():
    x, y = torch.rand(32, 1, 28, 28), torch.arange(32) % 4
    zs = [torch.randn(32, 16, 28, 28), torch.randn(32, 64)]

    def terms(max_features):
        objective = HSICObjective(HSICConfig(max_kernel_features=max_features), num_classes=4)
        return objective.stage_losses(zs, objective.kernel_factors(x, y))

    full, pooled = terms(None), terms(2048)
    assert not torch.allclose(full.nhsic_zx[0], pooled.nhsic_zx[0])
    assert torch.equal(full.loss[1], pooled.loss[1])  # the flat layer's loss is bit for bit the same


def test_max_kernel_features_is_validated_and_off_by_default():
    with pytest.raises(ConfigError, match="hsic.max_kernel_features"):
        build_config(overrides={"hsic.max_kernel_features": 0})
    assert build_config().hsic.max_kernel_features is None  # the paper's objective: kernels on whole outputs
    assert build_config(overrides={"hsic.max_kernel_features": 2048}).hsic.max_kernel_features == 2048
    assert build_config(overrides={"hsic.max_kernel_features": NULL}).hsic.max_kernel_features is None


@pytest.mark.parametrize("input_shape, early_side", [((1, 28, 28), 14), ((3, 32, 32), 16)])
def test_deep_conv_pools_the_two_larger_stages_by_two_and_keeps_the_last_whole(input_shape, early_side):
    cfg = build_config("deep_conv")
    net = build_network(cfg.model, input_shape)
    most = cfg.hsic.max_kernel_features
    conv_maps = [shape for shape in net.shapes[1:] if len(shape) == 3]
    stages = sorted(set(conv_maps), key=lambda shape: shape[0])
    assert [shape[0] for shape in stages] == [16, 32, 64]
    first, second, last = stages
    assert kernel_pool(first, most) == 2 and kernel_features(first, most) == 16 * early_side**2
    assert kernel_pool(second, most) == 2
    assert kernel_pool(last, most) == 1 and kernel_features(last, most) == 64 * last[1] * last[2]
    for other in ("paper_mlp", "paper_resconv", "deep_mlp"):  # the paper's objective: whole outputs
        assert build_config(other).hsic.max_kernel_features is None


def test_step_costs_count_the_conv_layers_and_their_kernels_on_the_pooled_view():
    net = conv_net(depth=8, width=16)
    assert forward_macs(net.layers[0], (1, 28, 28)) == 9 * 16 * 28 * 28
    assert forward_macs(net.layers[1], (16, 28, 28)) == 9 * 16 * 16 * 28 * 28
    full, pooled = layer_step_costs(net, 256), layer_step_costs(net, 256, max_kernel_features=2048)
    assert len(pooled) == len(net) and all(c > 0 for c in pooled)
    m = 256
    for i, shape in enumerate(net.shapes[1:]):
        difference = 6.0 * m * m * (kernel_features(shape, None) - kernel_features(shape, 2048))
        assert full[i] - pooled[i] == pytest.approx(difference)
    assert full[1] > pooled[1] and full[-1] == pooled[-1]


def tiny_conv(out, trainer="local", **extra):
    overrides = {
        "trainer": trainer,
        "output": str(out),
        "model.arch": "conv",
        "model.depth": 2,
        "model.width": 4,
        "train.batch_size": 128,
        "train.epochs": 1,
        "head.epochs": 1,
        "train.eval_samples": 128,
        "train.probe_samples": 256,
        "train.bn_calibration_batches": 2,
        "train.log_every": 5,
        **extra,
    }
    return build_config("paper_mlp", overrides=overrides)


def test_train_deep_takes_model_arch_conv_as_a_setting(tmp_path):
    args = train_deep.parse_args(["--depth", "3", "model.arch=conv", "--output", str(tmp_path / "run")])
    cfg = build_run_config(args, RUN_FLAGS, HSIC_FLAGS)  # as the job builds its config
    assert (cfg.model.arch, cfg.model.depth, cfg.num_hsic_layers) == ("conv", 3, 5)


@pytest.mark.slow
def test_conv_net_trains_in_process_on_real_digits(tmp_path, digits):
    metrics = run_hsic(tiny_conv(tmp_path / "run", **{"train.max_steps": 4}), digits)
    assert metrics["steps"] == 4
    assert len(metrics["per_layer"]) == 4
    assert all(layer["nhsic_zy"] > 0 for layer in metrics["per_layer"])
    assert metrics["test_accuracy_unformatted"] > 20  # 10 % is chance; 4 steps already separate digits


@pytest.mark.slow
@pytest.mark.parametrize("skips", [False, True])
def test_backprop_trains_the_conv_net(tmp_path, digits, skips):
    settings = {"train.max_steps": 4, "backprop.lr": 0.05, "model.skips": skips}
    metrics = run_backprop(tiny_conv(tmp_path / "run", **settings), digits)
    assert metrics["steps"] == 4
    assert len(metrics["grad_norms"]) == 4 and all(g > 0 for g in metrics["grad_norms"])


@pytest.mark.slow
def test_the_ray_pipeline_reproduces_the_in_process_trainer_on_the_conv_net(tmp_path, digits):
    from test_ray_pipeline import assert_same_training, run_local_and_ray

    ray.init(address="local", num_cpus=3, num_gpus=0, include_dashboard=False)
    try:
        grouping = {"ray.stages": 2, "ray.max_in_flight": 1, "ray.batches_per_call": 1}
        local, piped = run_local_and_ray(tmp_path, digits, tiny_conv, grouping)
    finally:
        shutdown()
    assert piped["stages"] == 2
    assert_same_training(tmp_path, local, piped)

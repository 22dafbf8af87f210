"""The per-layer objective and the stage's training step: local losses, one forward per layer, no gradient
crossing layers, persistent optimizers."""

import copy

import pytest
import torch
from torch.nn import functional as F

from hsic_ray.config import HSICConfig, ModelConfig, OptimConfig
from hsic_ray.hsic import biased_factor, center, gaussian_kernel, hsic_biased, hsic_cca, hsic_cka
from hsic_ray.models import build_network
from hsic_ray.objective import AUTO_FACTOR_GROUP, HSICObjective, factor_group_size, input_weights
from hsic_ray.stage_step import StageStep, layer_lr_scales


def _batch(m=32, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(m, 1, 6, 6, generator=g)
    y = torch.randint(0, classes, (m,), generator=g)
    return x, y


def _net(depth=2, width=16, last=4, seed=0):
    torch.manual_seed(seed)
    return build_network(ModelConfig(depth=depth, width=width, last_width=last), (1, 6, 6))


@pytest.mark.parametrize("estimator, direct", [("cca", hsic_cca), ("biased", hsic_biased), ("cka", hsic_cka)])
def test_stage_losses_with_shared_factors_equal_direct_estimates(estimator, direct):
    x, y = _batch()
    g = torch.Generator().manual_seed(5)
    zs = [torch.randn(32, 8, generator=g), torch.randn(32, 3, generator=g), torch.randn(32, 1, 2, 2, generator=g)]
    cfg = HSICConfig(estimator=estimator, sigma=2.0, beta=7.0)
    objective = HSICObjective(cfg, num_classes=4)
    terms = objective.stage_losses(zs, objective.kernel_factors(x, y))
    kx, ky = gaussian_kernel(x, 2.0), gaussian_kernel(F.one_hot(y, 4).float(), 2.0)
    assert not terms.failed.any()
    for i, z in enumerate(zs):
        kz = gaussian_kernel(z, 2.0)
        # Two float32 computations, each within ~1e-4 of float64 (the closed form subtracts from tr(T), the
        # factor form solves): compared at 3e-4, the loss at the precision of its terms.
        zx, zy = direct(kz, kx).item(), direct(kz, ky).item()
        assert terms.nhsic_zx[i].item() == pytest.approx(zx, rel=3e-4)
        assert terms.nhsic_zy[i].item() == pytest.approx(zy, rel=3e-4)
        assert terms.loss[i].item() == pytest.approx(zx - 7.0 * zy, abs=3e-4 * (abs(zx) + 7.0 * abs(zy)))


def test_plausible_compresses_against_the_layer_itself():
    x, y = _batch()
    z = torch.randn(32, 8)
    objective = HSICObjective(HSICConfig(estimator="plausible", sigma=None, beta=2.0), num_classes=4)
    factors = objective.kernel_factors(x, y)
    assert factors.x_factor is None
    terms = objective.stage_losses([z], factors)
    kz = gaussian_kernel(z, None)
    ky = gaussian_kernel(F.one_hot(y, 4).float(), None)
    assert terms.nhsic_zx.item() == pytest.approx(hsic_biased(kz, kz).item(), rel=1e-5)
    expected = (biased_factor(kz) ** 2).sum() - 2.0 * (biased_factor(kz) * biased_factor(ky)).sum()
    assert terms.loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_closed_form_cca_loss_has_the_gradient_of_the_factor_form():
    """tr(M) - eps m <A^-1, M> is <R_Z, R_X> - beta <R_Z, R_Y>: same value and same gradient in Z (float64)."""
    x, y = _batch(m=24)
    x, z = x.double(), torch.randn(24, 5, dtype=torch.float64, requires_grad=True)
    objective = HSICObjective(HSICConfig(sigma=1.5, beta=3.0, eps=1e-3), num_classes=4)
    factors = objective.kernel_factors(x, y)
    closed = objective.stage_losses([z], factors).loss[0]
    (g_closed,) = torch.autograd.grad(closed, z)
    factor = objective.estimator.factor(gaussian_kernel(z, 1.5))
    direct = (factor * factors.x_factor).sum() - 3.0 * (factor * factors.y_factor).sum()
    (g_direct,) = torch.autograd.grad(direct, z)
    torch.testing.assert_close(closed, direct, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(g_closed, g_direct, rtol=1e-8, atol=1e-10)
    assert g_closed.abs().max() > 1e-6


def test_input_weight_rises_linearly_from_the_first_layer_to_one_at_the_last():
    assert input_weights(-3.0, range(4), 4) == pytest.approx([-3.0, -5 / 3, -1 / 3, 1.0])
    assert input_weights(-3.0, range(2, 4), 4) == pytest.approx([-1 / 3, 1.0])  # a stage holding layers 2 and 3
    assert input_weights(1.0, range(5), 5) == [1.0] * 5


def test_input_weights_weigh_each_layers_compression_term_in_value_and_gradient():
    """With hsic.input_weight_first, layer i's loss is w_i <R_Z, R_X> - beta <R_Z, R_Y>, in value and in
    gradient; a stage holding the last two of four layers gives them the same weights as the whole network."""
    x, y = _batch(m=24)
    x = x.double()
    g = torch.Generator().manual_seed(3)
    zs = [torch.randn(24, 5, dtype=torch.float64, generator=g).requires_grad_() for _ in range(4)]
    cfg = HSICConfig(sigma=1.5, beta=3.0, eps=1e-3, input_weight_first=-2.0)
    whole = HSICObjective(cfg, num_classes=4, layers=range(4), num_layers=4)
    factors = whole.kernel_factors(x, y)
    losses = whole.stage_losses(zs, factors).loss
    for z, w, loss in zip(zs, [-2.0, -1.0, 0.0, 1.0], losses):
        factor = whole.estimator.factor(gaussian_kernel(z, 1.5))
        direct = w * (factor * factors.x_factor).sum() - 3.0 * (factor * factors.y_factor).sum()
        torch.testing.assert_close(loss, direct, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(
            torch.autograd.grad(loss, z, retain_graph=True)[0], torch.autograd.grad(direct, z)[0], rtol=1e-8, atol=1e-10
        )
    tail = HSICObjective(cfg, num_classes=4, layers=range(2, 4), num_layers=4)
    torch.testing.assert_close(tail.stage_losses(zs[2:], factors).loss, losses[2:])
    with pytest.raises(ValueError, match="layers and num_layers"):
        HSICObjective(cfg, num_classes=4).stage_losses(zs, factors)


def test_layer_sigma_sets_the_width_of_the_layers_kernels_only():
    x, y = _batch()
    z = torch.randn(32, 8, generator=torch.Generator().manual_seed(9))
    objective = HSICObjective(HSICConfig(sigma=2.0, layer_sigma=0.7, beta=7.0), num_classes=4)
    terms = objective.stage_losses([z], objective.kernel_factors(x, y))
    kz, kx, ky = gaussian_kernel(z, 0.7), gaussian_kernel(x, 2.0), gaussian_kernel(F.one_hot(y, 4).float(), 2.0)
    assert terms.nhsic_zx.item() == pytest.approx(hsic_cca(kz, kx).item(), rel=3e-4)
    assert terms.nhsic_zy.item() == pytest.approx(hsic_cca(kz, ky).item(), rel=3e-4)
    assert terms.nhsic_zy.item() != pytest.approx(hsic_cca(gaussian_kernel(z, 2.0), ky).item(), rel=1e-2)


def test_leave_one_out_trains_on_the_left_out_fit_and_measures_the_papers_nhsic():
    """With hsic.leave_one_out the loss is built from <H_loo(Z), R_X> and <H_loo(Z), R_Y>, in value and gradient;
    the information plane's measurement stays the paper's nHSIC, the same as without it."""
    x, y = _batch(m=24)
    x = x.double()
    z = torch.randn(24, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(8)).requires_grad_()
    cfg = HSICConfig(sigma=1.5, beta=3.0, eps=1e-3, leave_one_out=True)
    objective = HSICObjective(cfg, num_classes=4)
    factors = objective.kernel_factors(x, y)
    loss = objective.stage_losses([z], factors).loss[0]
    kc = center(gaussian_kernel(z, 1.5))
    # H_loo = I - diag(B)^-1 B, B = (Kc + eps m I)^-1: the leave-one-out hat matrix of the ridge fit.
    inverse = torch.linalg.inv(kc + 1e-3 * 24 * torch.eye(24, dtype=torch.float64))
    hat = torch.eye(24, dtype=torch.float64) - inverse / inverse.diagonal().unsqueeze(-1)
    direct = (hat * factors.x_factor).sum() - 3.0 * (hat * factors.y_factor).sum()
    torch.testing.assert_close(loss, direct, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(
        torch.autograd.grad(loss, z, retain_graph=True)[0], torch.autograd.grad(direct, z)[0], rtol=1e-7, atol=1e-9
    )
    paper = HSICObjective(HSICConfig(sigma=1.5, beta=3.0, eps=1e-3), num_classes=4)
    assert loss.item() != pytest.approx(paper.stage_losses([z], factors).loss.item(), rel=1e-2)
    torch.testing.assert_close(objective.dependence([z.detach()], factors), paper.dependence([z.detach()], factors))


def test_each_layer_steps_on_its_own_loss_only():
    """Layer i's first SGD step equals -lr * (grad of its own local loss + weight decay): nothing from later layers."""
    net = _net()
    x, y = _batch()
    objective = HSICObjective(HSICConfig(sigma=2.0, beta=5.0), num_classes=4)
    optim = OptimConfig(lr=0.1, momentum=0.9, weight_decay=1e-3)
    reference = copy.deepcopy(net)
    stage = StageStep(list(net.layers), objective, optim)
    factors = objective.kernel_factors(x, y)
    stage.train_step(x, factors)

    inp = x
    for before, after in zip(reference.layers, net.layers):
        z = before(inp)
        params = list(before.parameters())
        grads = torch.autograd.grad(objective.stage_losses([z], factors).loss[0], params)
        for p0, g, p1 in zip(params, grads, after.parameters()):
            assert torch.allclose(p1, p0 - 0.1 * (g + 1e-3 * p0), atol=1e-6)
        inp = z.detach()


def test_one_forward_per_layer_per_step():
    net = _net(depth=4)
    calls = [0] * len(net)
    for i, layer in enumerate(net.layers):
        layer.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    objective = HSICObjective(HSICConfig(sigma=2.0), num_classes=4)
    stage = StageStep(list(net.layers), objective, OptimConfig())
    x, y = _batch()
    for _ in range(3):
        stage.train_step(x, objective.kernel_factors(x, y))
    assert calls == [3] * len(net)


def test_momentum_persists_across_steps():
    net = _net()
    objective = HSICObjective(HSICConfig(sigma=2.0), num_classes=4)
    stage = StageStep(list(net.layers), objective, OptimConfig(lr=0.01, momentum=0.9))
    x, y = _batch()
    stage.train_step(x, objective.kernel_factors(x, y))
    first = stage.optimizer.state[next(net.layers[0].parameters())]["momentum_buffer"].clone()
    stage.train_step(x, objective.kernel_factors(x, y))
    second = stage.optimizer.state[next(net.layers[0].parameters())]["momentum_buffer"]
    assert not torch.equal(first, second)
    assert second.abs().sum() > first.abs().sum() * 0.5  # accumulated, not rebuilt from zero


def test_training_raises_dependence_on_labels():
    net = _net(depth=1, width=32)
    objective = HSICObjective(HSICConfig(sigma=2.0, beta=50.0), num_classes=4)
    stage = StageStep(list(net.layers), objective, OptimConfig(lr=0.05))
    x, y = _batch(m=64)
    factors = objective.kernel_factors(x, y)
    _, before = stage.measure(x, factors)
    for _ in range(30):
        stage.train_step(x, factors)
    _, after = stage.measure(x, factors)
    assert after[-1, 1] > before[-1, 1] + 0.5


def test_state_dict_round_trip_restores_weights_optimizer_and_batchnorm():
    objective = HSICObjective(HSICConfig(sigma=2.0), num_classes=4)
    x, y = _batch()
    trained = StageStep(list(_net(seed=0).layers), objective, OptimConfig())
    for _ in range(2):
        trained.train_step(x, objective.kernel_factors(x, y))
    fresh = StageStep(list(_net(seed=1).layers), objective, OptimConfig())
    fresh.load_state_dict(copy.deepcopy(trained.state_dict()))
    assert fresh.steps == 2
    out_a, stats_a = trained.train_step(x, objective.kernel_factors(x, y))
    out_b, stats_b = fresh.train_step(x, objective.kernel_factors(x, y))
    assert torch.equal(out_a, out_b) and torch.equal(stats_a, stats_b)
    with pytest.raises(ValueError, match="layers"):
        StageStep(list(_net(depth=1).layers), objective, OptimConfig()).load_state_dict(trained.state_dict())


def test_badly_scaled_float32_activations_fall_back_to_float64():
    """Eval-mode BatchNorm deep in a young net can emit activations in the 1e4s: float32 distances then break
    the kernel's positive definiteness. The objective recomputes such a kernel in float64."""
    g = torch.Generator().manual_seed(3)
    z = (torch.randn(256, 10, generator=g) * 3e4).float()
    z[:128] = z[0] + torch.randn(128, 10, generator=g)  # many near-duplicates: kernel entries strictly in (0, 1)
    x, y = _batch(m=256)
    objective = HSICObjective(HSICConfig(sigma=6.0), num_classes=4)
    factors = objective.kernel_factors(x, y)
    with pytest.raises(FloatingPointError):
        hsic_cca(gaussian_kernel(z, 6.0), gaussian_kernel(z, 6.0))
    ((zx, zy),) = objective.dependence([z], factors).tolist()
    exact = HSICObjective(HSICConfig(sigma=6.0), 4).dependence([z.double()], objective.kernel_factors(x.double(), y))
    assert objective.dependence([z], factors).dtype == torch.float32
    assert zy == pytest.approx(exact[0, 1].item(), rel=1e-3)


@pytest.mark.parametrize("estimator", ["cca", "cka", "plausible"])
def test_host_free_factors_are_float64_factors_with_their_failure_flag_left_unread(estimator):
    # What a GPU computes (no host read in the loop), run here on the CPU: the factors of the float64
    # kernels in the inputs' precision, and a flag where the estimator's solve can fail.
    x, y = _batch(m=64)
    objective = HSICObjective(HSICConfig(sigma=2.0, estimator=estimator), num_classes=4)
    free, exact = objective.kernel_factors(x, y, host_free=True), objective.kernel_factors(x.double(), y)
    assert free.y_factor.dtype == torch.float32
    torch.testing.assert_close(free.y_factor.double(), exact.y_factor, rtol=0, atol=1e-6)
    if estimator == "plausible":
        assert free.x_factor is None
    else:
        torch.testing.assert_close(free.x_factor.double(), exact.x_factor, rtol=0, atol=1e-6)
    assert (free.failed is not None and not bool(free.failed)) if estimator == "cca" else free.failed is None
    broken = HSICObjective(HSICConfig(sigma=2.0, estimator=estimator, eps=-1.0), num_classes=4)
    if estimator == "cca":  # a system that is never positive definite: flagged, not raised
        assert bool(broken.kernel_factors(x, y, host_free=True).failed)
        with pytest.raises(FloatingPointError, match="not positive definite"):
            broken.kernel_factors(x, y)


@pytest.mark.parametrize("host_free", [False, True])
@pytest.mark.parametrize("sigma", [2.0, None])
@pytest.mark.parametrize("estimator", ["cca", "biased", "cka", "plausible"])
def test_a_groups_factors_computed_together_are_each_batchs_own(estimator, sigma, host_free):
    # train.factor_group: one batched call for several batches, where a GPU would take one per batch.
    batches = [_batch(m=40, seed=seed) for seed in range(3)]
    objective = HSICObjective(HSICConfig(sigma=sigma, estimator=estimator), num_classes=4)
    together = objective.group_kernel_factors([x for x, _ in batches], [y for _, y in batches], host_free)
    assert len(together) == 3
    for (x, y), factors in zip(batches, together):
        alone = objective.kernel_factors(x, y, host_free)
        for name in ("x_factor", "y_factor"):
            expected, actual = getattr(alone, name), getattr(factors, name)
            assert (actual is None) == (expected is None)
            if expected is not None:
                torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-7)
        assert (factors.failed is None) == (alone.failed is None)
        if factors.failed is not None:
            assert factors.failed.shape == alone.failed.shape and not bool(factors.failed)


def test_a_group_flags_only_the_batch_whose_solve_failed():
    batches = [_batch(m=40, seed=seed) for seed in range(3)]
    xs, ys = [x.clone() for x, _ in batches], [y for _, y in batches]
    xs[1][0, 0, 0, 0] = float("nan")  # its kernel system cannot be factored
    objective = HSICObjective(HSICConfig(sigma=2.0), num_classes=4)
    assert [bool(f.failed) for f in objective.group_kernel_factors(xs, ys, host_free=True)] == [False, True, False]
    with pytest.raises(FloatingPointError, match="not positive definite"):  # checked on the host: raised
        objective.group_kernel_factors(xs, ys)


def test_factors_are_grouped_on_a_gpu_within_a_memory_bound_and_not_on_a_cpu():
    assert factor_group_size(None, "cpu", 256) == 1
    assert factor_group_size(None, "cuda", 256) == factor_group_size(None, "cuda", 1024) == AUTO_FACTOR_GROUP
    assert factor_group_size(None, "cuda", 2048) == 2  # a group's float64 systems: 64 MiB
    assert factor_group_size(None, "cuda", 8192) == 1
    assert factor_group_size(3, "cpu", 256) == factor_group_size(3, "cuda", 8192) == 3


def test_lr_scales_fall_geometrically_and_each_layer_steps_at_its_own_rate():
    """With hsic.lr_scale_last, layer i's first SGD step is lr * scale_i times its gradient (no momentum
    yet, no weight decay): a stage of three layers at scales 1, 0.1, 0.01 moves each accordingly."""
    assert layer_lr_scales(0.01, range(3), 3) == pytest.approx([1.0, 0.1, 0.01])
    assert layer_lr_scales(0.01, range(2, 3), 3) == pytest.approx([0.01])
    x, y = _batch()
    net = _net(depth=1)
    objective = HSICObjective(HSICConfig(sigma=2.0, beta=5.0), num_classes=4)
    optim = OptimConfig(lr=0.05, momentum=0.0, weight_decay=0.0)
    uniform = StageStep([copy.deepcopy(layer) for layer in net.layers], objective, optim)
    scaled = StageStep([copy.deepcopy(layer) for layer in net.layers], objective, optim, lr_scales=[1.0, 0.1, 0.01])
    before = [[p.detach().clone() for p in layer.parameters()] for layer in net.layers]
    factors = objective.kernel_factors(x, y)
    uniform.train_step(x, factors)
    scaled.train_step(x, factors)
    for scale, start, a, b in zip([1.0, 0.1, 0.01], before, uniform.layers, scaled.layers):
        for p0, pa, pb in zip(start, a.parameters(), b.parameters()):
            torch.testing.assert_close(pb - p0, scale * (pa - p0), rtol=1e-4, atol=1e-7)  # BN makes bias steps ~0
        assert any((pa - p0).abs().max() > 0 for p0, pa in zip(start, a.parameters()))
    with pytest.raises(ValueError, match="3 layers"):
        StageStep(list(net.layers), objective, optim, lr_scales=[1.0])


def test_a_cpu_stage_evaluates_in_cache_sized_parts_and_gives_what_one_pass_gives(monkeypatch):
    from hsic_ray import stage_step

    net = _net(depth=3, width=16)  # every layer's output 16 floats wide: 64 bytes a sample
    whole = StageStep(list(net.layers), HSICObjective(HSICConfig(), 4), OptimConfig())
    monkeypatch.setattr(stage_step, "CPU_EVAL_PART_BYTES", 64 * 10)  # ten samples a part
    parted = StageStep(list(net.layers), HSICObjective(HSICConfig(), 4), OptimConfig())
    x, _ = _batch(m=37)
    calls = []
    net.layers[0].register_forward_hook(lambda module, inputs, output: calls.append(len(output)))
    out = parted.forward(x)
    assert parted._eval_part == 10 and calls == [1, 10, 10, 10, 7]  # one sample to size the parts, then four
    monkeypatch.setattr(stage_step, "CPU_EVAL_PART_BYTES", 10**9)
    assert whole.forward(x).shape == out.shape == (37, 4)
    assert torch.allclose(whole.forward(x), out, atol=1e-6)
    (out_whole, views_whole), (out_parted, views_parted) = whole.layer_outputs(x), parted.layer_outputs(x)
    assert torch.allclose(out_whole, out_parted, atol=1e-6) and len(views_whole) == len(views_parted) == len(net.layers)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(views_whole, views_parted))

"""The batched stage step against the sequential step it replaces, its closed-form gradient, its deferred
positive-definiteness checks, and the CUDA graph around it (the capture itself only where CUDA is)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from hsic_ray.config import ConfigError, HSICConfig, ModelConfig, OptimConfig, build_config
from hsic_ray.data import Batch, iterate_batches
from hsic_ray.experiment import build_seeded_network
from hsic_ray.hsic import ESTIMATORS, cca_inner, center, gaussian_kernel, spd_inverse
from hsic_ray.local_pipeline import LocalPipeline
from hsic_ray.models import LayerwiseNet, build_network
from hsic_ray.objective import HSICObjective, KernelFactors
from hsic_ray.schedule import LRSchedule
from hsic_ray.stage_step import StageStep, use_cuda_graphs
from hsic_ray.step_graph import rolled_back

CUDA = torch.cuda.is_available()


def _net_and_batches(digits, depth=3, width=48, batch=64, activation="elu"):
    cfg = build_config(
        "paper_mlp", overrides={"model.depth": depth, "model.width": width, "model.activation": activation}
    )
    net = build_seeded_network(cfg, digits)
    batches = list(iterate_batches(digits.x_train, digits.y_train, batch, seed=0, epoch=1))
    return net, batches


def _sequential_step(layers, optimizers, objective, x, factors):
    """The step as it was: each layer in turn, its own factor-form loss, backward and optimizer step."""
    est, beta, sigma = objective.estimator, objective.cfg.beta, objective.cfg.sigma
    stats = []
    for layer, optimizer in zip(layers, optimizers):
        z = layer.train()(x.detach())
        fz = est.factor(gaussian_kernel(z, sigma))
        zx = est.dependence(fz, fz if factors.x_factor is None else factors.x_factor)
        zy = est.dependence(fz, factors.y_factor)
        loss = zx - beta * zy
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        stats.append(torch.stack([loss.detach(), zx.detach(), zy.detach()]))
        x = z.detach()
    return x, torch.stack(stats)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_batched_step_equals_the_sequential_step(digits, estimator):
    """In float64, so that the comparison pins the algebra: in float32 the two orders of rounding drift
    apart by ~1e-4 per step at this learning rate, as any two float32 implementations would."""
    net, batches = _net_and_batches(digits)
    net = net.double()
    reference = copy.deepcopy(net)
    beta = 2.0 if estimator == "plausible" else 50.0
    objective = HSICObjective(HSICConfig(estimator=estimator, sigma=6.0, beta=beta), num_classes=10)
    optim = OptimConfig(lr=0.01, momentum=0.9, weight_decay=1e-3)
    stage = StageStep(list(net.layers), objective, optim)
    optimizers = [
        torch.optim.SGD(layer.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-3) for layer in reference.layers
    ]
    for batch in batches[:4]:
        x = batch.x.double()
        factors = objective.kernel_factors(x, batch.y)
        out, stats = stage.train_step(x, factors)
        ref_out, ref_stats = _sequential_step(list(reference.layers), optimizers, objective, x, factors)
        torch.testing.assert_close(stats, ref_stats, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(out, ref_out, rtol=1e-9, atol=1e-9)
    for (name, value), ref in zip(net.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(value, ref, rtol=1e-9, atol=1e-12, msg=name)  # weights and BatchNorm statistics
    assert any("running_var" in name for name in net.state_dict())


def _symmetric_factors(m, count, seed):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(count, m, m, generator=g, dtype=torch.float64)
    return t + t.mT


def test_cca_inner_matches_explicit_inverse_and_passes_gradcheck_float64():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 7, 4, generator=g, dtype=torch.float64)
    kernels = torch.stack([gaussian_kernel(v, 1.0) for v in z])
    factors = _symmetric_factors(7, 2, seed=1)
    inner, failed = cca_inner(kernels, factors, 1e-2)
    inverse = torch.linalg.inv(center(kernels) + 1e-2 * 7 * torch.eye(7, dtype=torch.float64))
    torch.testing.assert_close(inner, torch.einsum("kij,tij->kt", inverse, factors))
    assert failed.tolist() == [False, False, False]
    # Kernels are symmetric, so the gradient is checked along symmetric perturbations.
    kernels = kernels.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda k: cca_inner(0.5 * (k + k.mT), factors, 1e-2)[0], (kernels,))


def _leave_one_out_hat(kc, ridge):
    """Row i: the weights kernel ridge regression fitted on every sample but i gives the others to predict i."""
    m = kc.shape[-1]
    hat = torch.zeros_like(kc)
    for i in range(m):
        rest = [j for j in range(m) if j != i]
        hat[i, rest] = kc[i, rest] @ torch.linalg.inv(kc[rest][:, rest] + ridge * torch.eye(m - 1, dtype=kc.dtype))
    return hat


def test_leave_one_out_cca_inner_scores_each_sample_by_a_fit_that_left_it_out_float64():
    """tr(T) - cca_inner(..., leave_one_out=True) = <H_loo, T> with H_loo refitted m times by brute force, and its
    hand-written backward passes gradcheck; it differs from the in-sample fit, which it is not."""
    g = torch.Generator().manual_seed(4)
    z = torch.randn(3, 7, 4, generator=g, dtype=torch.float64)
    kernels = torch.stack([gaussian_kernel(v, 1.0) for v in z])
    factors = _symmetric_factors(7, 2, seed=5)
    inner, failed = cca_inner(kernels, factors, 1e-2, leave_one_out=True)
    left_out = factors.diagonal(dim1=-2, dim2=-1).sum(-1) - inner
    brute = torch.stack(
        [torch.einsum("ij,tij->t", _leave_one_out_hat(kc, 1e-2 * 7), factors) for kc in center(kernels)]
    )
    torch.testing.assert_close(left_out, brute)
    in_sample = factors.diagonal(dim1=-2, dim2=-1).sum(-1) - 1e-2 * 7 * cca_inner(kernels, factors, 1e-2)[0]
    assert not torch.allclose(left_out, in_sample, rtol=1e-2) and failed.tolist() == [False] * 3
    kernels = kernels.clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda k: cca_inner(0.5 * (k + k.mT), factors, 1e-2, leave_one_out=True)[0], (kernels,)
    )


def test_both_routes_to_the_inverse_agree():
    """The CUDA route (triangular solve and product: no host check) against the CPU's (LAPACK's potri), both
    run here, on positive definite matrices and on one that is not."""
    kc = torch.stack([center(gaussian_kernel(torch.randn(9, 4, dtype=torch.float64), 1.0)) for _ in range(3)])
    systems = kc + 1e-2 * 9 * torch.eye(9, dtype=torch.float64)
    systems[1] = -systems[1]
    host_free, failed = spd_inverse(systems, host_free=True)
    lapack_route, lapack_failed = spd_inverse(systems, host_free=False)
    assert failed.tolist() == lapack_failed.tolist() == [False, True, False]
    torch.testing.assert_close(host_free, lapack_route)
    torch.testing.assert_close(host_free[[0, 2]], torch.linalg.inv(systems[[0, 2]]))
    assert host_free[1].abs().max() == 0


@pytest.mark.parametrize("leave_one_out", [False, True])
def test_a_failed_solve_is_recorded_not_raised_and_never_yields_nan(leave_one_out):
    k = gaussian_kernel(torch.randn(6, 3, dtype=torch.float64), 1.0)
    kernels = torch.stack([k, -k - torch.eye(6, dtype=torch.float64)]).requires_grad_()  # the second: not PD
    inner, failed = cca_inner(kernels, _symmetric_factors(6, 1, seed=2), 1e-3, leave_one_out=leave_one_out)
    assert failed.tolist() == [False, True]
    assert torch.isfinite(inner).all() and inner[1].abs().max() == 0
    (grad,) = torch.autograd.grad(inner.sum(), kernels)
    assert torch.isfinite(grad).all() and grad[1].abs().max() == 0 and grad[0].abs().max() > 0


class _Scale(nn.Module):
    """A layer whose output is its input times a constant: lets a test choose a layer's activations."""

    def __init__(self, factor: float):
        super().__init__()
        self.weight = nn.Parameter(torch.tensor(factor))

    def forward(self, x):
        return x * self.weight


def _near_duplicates(m=256, seed=3):
    """Activations whose float32 kernel is not positive definite but whose float64 kernel is (see
    test_objective_and_stage.test_badly_scaled_float32_activations_fall_back_to_float64)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(m, 10, generator=g)
    z[: m // 2] = z[0] + torch.randn(m // 2, 10, generator=g) / 3e4
    return z


def test_float32_failure_switches_the_stage_to_float64_at_the_next_check():
    objective = HSICObjective(HSICConfig(sigma=6.0, beta=10.0), num_classes=4)
    stage = StageStep([_Scale(3e4)], objective, OptimConfig(lr=1e-12))
    x, y = _near_duplicates(), torch.arange(256) % 4
    factors = objective.kernel_factors(torch.rand(256, 5), y)
    for _ in range(2):
        out, stats = stage.train_step(x, factors)  # no exception inside the step
    assert torch.isfinite(stats).all() and torch.isfinite(stage.layers[0].weight).all()
    assert stage.kernel_dtype is None
    stage.check_solves()
    assert stage.kernel_dtype == torch.float64
    stage.train_step(x, factors)
    stage.check_solves()  # float64 keeps the system positive definite: nothing to report
    assert stage.state_dict()["kernel_dtype"] == "torch.float64"


def test_failure_in_float64_raises_at_the_check_and_before_a_checkpoint():
    objective = HSICObjective(HSICConfig(sigma=6.0, beta=10.0, eps=-1.0), num_classes=4)  # never positive definite
    stage = StageStep([nn.Linear(5, 5)], objective, OptimConfig(lr=0.1))
    x = torch.rand(32, 5)
    factors = KernelFactors(torch.eye(32) * 0.5, torch.eye(32) * 0.25)  # objective.kernel_factors would refuse eps < 0
    stage.train_step(x, factors)
    stage.check_solves()  # float32 failure: switch to float64
    stage.train_step(x, factors)
    assert torch.isfinite(stage.layers[0].weight).all()
    with pytest.raises(FloatingPointError, match="not positive definite.*eps"):
        stage.state_dict()


def test_factors_that_failed_on_the_device_raise_at_the_check_and_before_a_checkpoint():
    # On a GPU, `objective.kernel_factors` leaves the solve's status with the factors (no host read in the loop);
    # the stage folds it into its own record, so the run stops at the next check, before any checkpoint.
    objective = HSICObjective(HSICConfig(sigma=6.0, beta=10.0), num_classes=4)
    stage = StageStep([nn.Linear(5, 5)], objective, OptimConfig(lr=0.1))
    x, labels = torch.rand(32, 5), torch.arange(32) % 4
    good = objective.kernel_factors(x, labels)
    stage.train_step(x, KernelFactors(good.x_factor, good.y_factor, failed=torch.tensor(False)))
    stage.check_solves()  # a flag that says nothing failed is no failure
    stage.train_step(x, KernelFactors(good.x_factor, good.y_factor, failed=torch.tensor(True)))
    stage.train_step(x, good)  # a later good batch does not clear it
    with pytest.raises(FloatingPointError, match="a batch's inputs or labels, in float64"):
        stage.state_dict()


def test_rolled_back_warm_up_leaves_the_next_step_as_if_it_never_ran(digits):
    """What CUDA graph capture relies on, checked where it can run: warm-up steps inside `rolled_back`
    leave weights, BatchNorm statistics and momentum exactly as they were (none yet, and then some)."""
    net, batches = _net_and_batches(digits)
    objective = HSICObjective(HSICConfig(sigma=6.0, beta=50.0), num_classes=10)
    stage = StageStep(list(net.layers), objective, OptimConfig(lr=0.01))
    twin = StageStep(list(copy.deepcopy(net).layers), objective, OptimConfig(lr=0.01))
    factors = [objective.kernel_factors(b.x, b.y) for b in batches[:3]]
    for i, batch in enumerate(batches[:3]):
        with rolled_back(stage.layers, stage.optimizer):
            for _ in range(3):
                stage._step(batch.x, factors[i])
        out, stats = stage.train_step(batch.x, factors[i])
        twin_out, twin_stats = twin.train_step(batch.x, factors[i])
        assert torch.equal(out, twin_out) and torch.equal(stats, twin_stats)
    for a, b in zip(stage.optimizer.state.values(), twin.optimizer.state.values()):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])


def test_cuda_graph_setting_is_checked():
    assert use_cuda_graphs("auto", torch.device("cpu")) is False
    assert use_cuda_graphs("off", torch.device("cuda")) is False
    assert use_cuda_graphs("auto", torch.device("cuda")) is True
    with pytest.raises(ValueError, match="cuda_graphs=on needs a CUDA device"):
        use_cuda_graphs("on", torch.device("cpu"))
    with pytest.raises(ConfigError, match="train.cuda_graphs"):
        build_config(overrides={"train.cuda_graphs": "sometimes"})
    with pytest.raises(ConfigError, match="CUDA graphs need a CUDA device"):
        build_config(overrides={"train.cuda_graphs": "on", "train.device": "cpu"})


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a CUDA device (their logic is tested above on CPU)")
@pytest.mark.parametrize(
    "schedule, leave_one_out",
    [
        (None, False),
        (LRSchedule("cosine", 6), False),  # the graph reads each step's factor
        (None, True),  # the left-out fit divides by the inverse's diagonal, inside the graph
    ],
)
def test_cuda_graph_step_equals_the_eager_step(digits, schedule, leave_one_out):
    net, batches = _net_and_batches(digits)
    objective = HSICObjective(HSICConfig(sigma=6.0, beta=50.0, leave_one_out=leave_one_out), num_classes=10)
    graphed = StageStep(list(net.layers), objective, OptimConfig(lr=0.01), "cuda", cuda_graphs="on", schedule=schedule)
    eager = StageStep(
        list(copy.deepcopy(net).layers), objective, OptimConfig(lr=0.01), "cuda", cuda_graphs="off", schedule=schedule
    )
    for batch in batches[:4] + [batches[-1]]:  # the last batch is partial: it runs eagerly
        factors = objective.kernel_factors(batch.x, batch.y)
        out, stats = graphed.train_step(batch.x, factors)
        ref_out, ref_stats = eager.train_step(batch.x, factors)
        torch.testing.assert_close(stats, ref_stats, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-4)
    graphed.load_state_dict(eager.state_dict())  # recapture after a load
    out, _ = graphed.train_step(batches[0].x, objective.kernel_factors(batches[0].x, batches[0].y))
    ref_out, _ = eager.train_step(batches[0].x, objective.kernel_factors(batches[0].x, batches[0].y))
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-4)


def test_the_in_process_pipeline_checks_solves_only_where_the_loop_reads_back():
    objective = HSICObjective(HSICConfig(sigma=6.0, beta=10.0), num_classes=4)
    pipeline = LocalPipeline(LayerwiseNet([_Scale(3e4)], [(10,), (10,)]), objective, OptimConfig(lr=1e-12), "cpu")
    x, factors = _near_duplicates(), objective.kernel_factors(torch.rand(256, 5), torch.arange(256) % 4)
    handle = pipeline.submit(Batch(x, torch.arange(256) % 4, epoch=1, index=0), factors)
    pipeline.result(handle, want_output=False, read_back=False)
    assert pipeline.stage.kernel_dtype is None  # the failure is recorded, not yet read
    result = pipeline.result(handle, want_output=False, read_back=True)
    assert pipeline.stage.kernel_dtype == torch.float64 and result.layer_stats.device.type == "cpu"


def test_batchnorm_calibration_averages_the_batches_statistics_with_the_current_weights():
    torch.manual_seed(0)
    net = build_network(ModelConfig(depth=1, width=16, last_width=4), (1, 4, 4))
    stage = StageStep(list(net.layers), HSICObjective(HSICConfig(sigma=6.0), num_classes=4), OptimConfig(), "cpu")
    batches = [torch.rand(32, 1, 4, 4) for _ in range(3)]
    first = net.layers[0]
    linear, norm = first[1], first[2]
    norm.running_mean.fill_(5.0)  # stale statistics of older weights
    outputs = stage.calibrate_batchnorm(batches)
    with torch.no_grad():
        pre = [linear(b.flatten(1)) for b in batches]
    assert torch.allclose(norm.running_mean, torch.stack([p.mean(0) for p in pre]).mean(0), atol=1e-6)
    assert torch.allclose(norm.running_var, torch.stack([p.var(0) for p in pre]).mean(0), atol=1e-5)
    assert norm.momentum == 0.1 and len(outputs) == 3
    with torch.no_grad():  # what the next stage receives: this stage's train-mode output of each batch
        assert torch.allclose(outputs[2], net.train()(batches[2]), atol=1e-6)

"""Learning-rate schedules: the factor's values, the HSIC stage's scaled steps, the backprop optimizer's lr."""

import copy
import math

import pytest
import torch

from hsic_ray.config import HSICConfig, ModelConfig, OptimConfig, TrainConfig
from hsic_ray.models import build_network
from hsic_ray.objective import HSICObjective
from hsic_ray.schedule import LRSchedule, planned_steps
from hsic_ray.stage_step import StageStep, make_sgd


def test_cosine_falls_from_one_to_zero_over_the_planned_steps():
    cosine = LRSchedule("cosine", 100)
    assert cosine.factor(0) == 1.0
    assert cosine.factor(50) == pytest.approx(0.5)
    assert cosine.factor(25) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert cosine.factor(100) == pytest.approx(0.0, abs=1e-12) and cosine.factor(150) == cosine.factor(100)
    factors = [cosine.factor(step) for step in range(101)]
    assert all(a > b for a, b in zip(factors, factors[1:]))
    assert {LRSchedule("constant", 100).factor(step) for step in (0, 50, 100)} == {1.0}
    assert LRSchedule("cosine", 0).factor(5) == 1.0  # nothing planned: nothing to anneal
    with pytest.raises(ValueError, match="expected one of constant, cosine"):
        LRSchedule("linear", 10)


def test_planned_steps_count_every_batch_of_every_epoch_up_to_max_steps():
    assert planned_steps(TrainConfig(batch_size=256, epochs=5), 50_000) == 5 * 195  # the partial last batch is dropped
    assert planned_steps(TrainConfig(batch_size=100, epochs=30, max_steps=250), 1000) == 250
    assert planned_steps(TrainConfig(batch_size=100, epochs=3, max_steps=250), 1000) == 30
    assert LRSchedule.for_run(
        OptimConfig(schedule="cosine"), TrainConfig(batch_size=100, epochs=3), 1000
    ) == LRSchedule("cosine", 30)


PLAIN_SGD = OptimConfig(lr=0.05, momentum=0.0, weight_decay=0.0)


def _stage(schedule=None, optim=PLAIN_SGD):
    """A stage of three layers in float64: the cca loss's backward amplifies float32 rounding (a gradient
    scaled by f differs from f times the gradient by up to 5e-5), float64 keeps the comparison tight."""
    torch.manual_seed(0)
    net = build_network(ModelConfig(depth=1, width=16, last_width=4), (1, 6, 6)).double()
    objective = HSICObjective(HSICConfig(sigma=2.0, beta=5.0), num_classes=4)
    return StageStep(list(net.layers), objective, optim, schedule=schedule), objective


def _batches(n, m=32):
    g = torch.Generator().manual_seed(1)
    return [
        (torch.rand(m, 1, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 4, (m,), generator=g))
        for _ in range(n)
    ]


def _params(stage):
    return [p.detach().clone() for layer in stage.layers for p in layer.parameters()]


def test_a_scheduled_stage_steps_as_sgd_at_the_scheduled_learning_rate():
    """Without momentum, each step of a cosine-scheduled stage equals a step of plain SGD whose lr is set to
    lr x factor(step) before it, and the step's reported losses are the unscaled ones."""
    schedule = LRSchedule("cosine", 4)
    scheduled, objective = _stage(schedule)
    manual, _ = _stage()
    constant, _ = _stage()
    for step, (x, y) in enumerate(_batches(3)):
        factors = objective.kernel_factors(x, y)
        for group in manual.optimizer.param_groups:
            group["lr"] = 0.05 * schedule.factor(step)
        _, stats = scheduled.train_step(x, factors)
        _, manual_stats = manual.train_step(x, factors)
        constant.train_step(x, factors)
        torch.testing.assert_close(stats, manual_stats)
        for a, b in zip(_params(scheduled), _params(manual)):
            # lr x (f x g) against (lr x f) x g, f held as a float32 scalar on the stage
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)
    # ... and that is not where constant steps lead (factors 1, 0.85, 0.5: up to 0.11 apart on this net).
    assert max((a - b).abs().max() for a, b in zip(_params(scheduled), _params(constant))) > 1e-3
    assert scheduled.optimizer.param_groups[0]["lr"] == 0.05  # the schedule left SGD's own lr alone


def test_a_restored_stage_continues_the_schedule_where_the_checkpoint_left_it():
    schedule = LRSchedule("cosine", 6)
    optim = OptimConfig(lr=0.05, momentum=0.9, weight_decay=1e-3)
    batches = _batches(4)
    straight, objective = _stage(schedule, optim)
    for x, y in batches[:2]:
        straight.train_step(x, objective.kernel_factors(x, y))
    restored, _ = _stage(schedule, optim)
    restored.load_state_dict(copy.deepcopy(straight.state_dict()))
    fresh_count, _ = _stage(LRSchedule("cosine", 6), optim)  # same weights, but its step count starts at 0
    fresh_count.load_state_dict(copy.deepcopy(straight.state_dict()))
    fresh_count.steps = 0
    for x, y in batches[2:]:
        for stage in (straight, restored, fresh_count):
            stage.train_step(x, objective.kernel_factors(x, y))
    for a, b in zip(_params(straight), _params(restored)):
        torch.testing.assert_close(a, b)
    assert any(not torch.allclose(a, b) for a, b in zip(_params(straight), _params(fresh_count)))


def test_apply_sets_each_groups_lr_from_its_initial_lr_which_an_optimizer_checkpoint_keeps():
    schedule = LRSchedule("cosine", 10)
    model = torch.nn.Linear(3, 2)
    optimizer = make_sgd(model.parameters(), OptimConfig(lr=0.2))
    schedule.apply(optimizer, 5)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1)
    reloaded = make_sgd(model.parameters(), OptimConfig(lr=0.2))
    reloaded.load_state_dict(optimizer.state_dict())  # holds lr 0.1 and initial_lr 0.2
    schedule.apply(reloaded, 7)
    assert reloaded.param_groups[0]["lr"] == pytest.approx(0.2 * schedule.factor(7))

"""hsic_ray.sgd.SGD against torch.optim.SGD: the same parameters after every step, state_dicts that load in
either, and no torch._dynamo import (the reason it exists)."""

import subprocess
import sys

import pytest
import torch
from torch import nn

from hsic_ray.sgd import SGD


def two_nets(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3), nn.BatchNorm1d(3, affine=True))
    twin = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3), nn.BatchNorm1d(3, affine=True))
    twin.load_state_dict(net.state_dict())
    return net, twin


def groups(net: nn.Module, lr: float) -> list[dict]:
    """Two groups of their own rates, as stages with hsic.lr_scale_last have."""
    return [{"params": list(net[0].parameters()), "lr": lr}, {"params": list(net[2:].parameters()), "lr": lr / 3}]


def train(net: nn.Module, optimizer, steps: int, first_step: int = 0) -> None:
    for step in range(first_step, first_step + steps):
        torch.manual_seed(100 + step)
        x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(net(x), y).backward()
        for group in optimizer.param_groups:  # a changing rate, as the cosine schedule sets it
            group["lr"] = group.setdefault("initial_lr", group["lr"]) * (1 - step / 20)
        optimizer.step()


@pytest.mark.parametrize("momentum, weight_decay", [(0.0, 0.0), (0.9, 0.0), (0.9, 1e-3), (0.0, 1e-2)])
@pytest.mark.parametrize("grouped", [False, True])
def test_every_step_equals_torch_sgd(momentum, weight_decay, grouped):
    net, twin = two_nets()
    params = (lambda n: groups(n, 0.1)) if grouped else (lambda n: n.parameters())
    ours = SGD(params(net), lr=0.1, momentum=momentum, weight_decay=weight_decay)
    theirs = torch.optim.SGD(params(twin), lr=0.1, momentum=momentum, weight_decay=weight_decay)
    for step in range(6):
        train(net, ours, 1, step)
        train(twin, theirs, 1, step)
        for a, b in zip(net.parameters(), twin.parameters()):
            assert torch.equal(a, b), step
    state, torch_state = ours.state_dict(), theirs.state_dict()
    assert state["param_groups"] == torch_state["param_groups"]
    assert state["state"].keys() == torch_state["state"].keys()
    for key, values in state["state"].items():
        assert torch.equal(values["momentum_buffer"], torch_state["state"][key]["momentum_buffer"])


@pytest.mark.parametrize("source", ["ours", "torch"])
def test_a_state_dict_of_either_resumes_the_same_run(source):
    """An old checkpoint holds torch.optim.SGD's state; a new one ours: either continues the run exactly."""
    reference, _ = two_nets()
    uninterrupted = SGD(groups(reference, 0.05), lr=0.05, momentum=0.9, weight_decay=1e-3)
    train(reference, uninterrupted, 8)

    first, second = two_nets()
    make = SGD if source == "ours" else torch.optim.SGD
    before = make(groups(first, 0.05), lr=0.05, momentum=0.9, weight_decay=1e-3)
    train(first, before, 4)
    saved = {"net": first.state_dict(), "optimizer": before.state_dict()}
    second.load_state_dict(saved["net"])
    resumed = SGD(groups(second, 0.05), lr=0.05, momentum=0.9, weight_decay=1e-3)
    resumed.load_state_dict(saved["optimizer"])
    saved["optimizer"]["state"][0]["momentum_buffer"].zero_()  # the optimizer holds copies, not the saved tensors
    train(second, resumed, 4, first_step=4)
    for a, b in zip(reference.parameters(), second.parameters()):
        assert torch.equal(a, b)

    back_in_torch = torch.optim.SGD(groups(two_nets()[0], 0.05), lr=0.05, momentum=0.9)
    back_in_torch.load_state_dict(resumed.state_dict())
    assert back_in_torch.state_dict()["param_groups"] == resumed.state_dict()["param_groups"]


def test_a_state_dict_of_another_shape_is_refused_naming_both():
    net, twin = two_nets()
    optimizer = SGD(groups(net, 0.1), lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match=r"groups of \[5\] parameters, this optimizer has \[2, 4\]"):
        optimizer.load_state_dict(SGD(twin.parameters(), lr=0.1).state_dict() | {"param_groups": [{"params": [0] * 5}]})


def test_zero_grad_drops_or_zeroes_the_gradients():
    net, _ = two_nets()
    optimizer = SGD(net.parameters(), lr=0.1)
    net(torch.randn(4, 6)).sum().backward()
    optimizer.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in net.parameters())
    optimizer.zero_grad()
    assert all(p.grad is None for p in net.parameters())


def test_bad_hyperparameters_are_refused():
    with pytest.raises(ValueError, match="lr, momentum and weight_decay >= 0"):
        SGD([torch.zeros(1, requires_grad=True)], lr=-1.0)


def test_training_a_stage_does_not_import_the_compiler():
    code = (
        "import sys, torch\n"
        "from torch import nn\n"
        "from hsic_ray.config import HSICConfig, OptimConfig\n"
        "from hsic_ray.objective import HSICObjective\n"
        "from hsic_ray.stage_step import StageStep\n"
        "objective = HSICObjective(HSICConfig(sigma=6.0, beta=50.0), num_classes=10)\n"
        "stage = StageStep([nn.Linear(8, 8), nn.Linear(8, 8)], objective, OptimConfig(lr=0.1, momentum=0.9))\n"
        "x, y = torch.randn(32, 8), torch.randint(0, 10, (32,))\n"
        "stage.train_step(x, objective.kernel_factors(x, y))\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"

"""SGD with momentum and weight decay: the update torch.optim.SGD makes, without torch.optim.

Every torch.optim optimizer imports torch._dynamo the first time it is built (its methods are wrapped to keep
the compiler out), and that import is the largest part of a training process's start-up after torch itself
(docs/results.md, "Start-up without torch.optim"). Every process that trains pays it: the driver, each stage actor, each
backprop worker and each sweep trial. This optimizer computes the same update with the same tensor
operations (`torch._foreach_*`, which torch.optim.SGD runs on CUDA and matches its per-tensor loop on the
CPU), and reads and writes the same `state_dict` layout, so checkpoints written with either load in the
other. It has what the project uses: parameter groups, `param_groups[i]["lr"]` set between steps (the
schedule), `state[param]["momentum_buffer"]` (a captured CUDA step saves and restores it), `zero_grad`,
`step`, `state_dict` and `load_state_dict`. No dampening, Nesterov or maximisation.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

# The hyperparameters torch.optim.SGD records in each group of its state_dict, with the values this one uses.
_TORCH_GROUP_DEFAULTS = {
    "dampening": 0,
    "nesterov": False,
    "maximize": False,
    "foreach": None,
    "differentiable": False,
    "fused": None,
}


class SGD:
    """`params`: tensors, or groups of them as dicts with their own settings (e.g. "lr"), as torch.optim takes."""

    def __init__(
        self, params: Iterable[Tensor] | Iterable[dict], lr: float, momentum: float = 0.0, weight_decay: float = 0.0
    ):
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(f"SGD needs lr, momentum and weight_decay >= 0, got {lr}, {momentum}, {weight_decay}")
        params = list(params)
        groups = params if params and isinstance(params[0], dict) else [{"params": params}]
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, **_TORCH_GROUP_DEFAULTS}
        self.param_groups: list[dict[str, Any]] = [{**defaults, **g, "params": list(g["params"])} for g in groups]
        self.state: defaultdict[Tensor, dict[str, Tensor]] = defaultdict(dict)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for param in self._params():
            if param.grad is None:
                continue
            if set_to_none:
                param.grad = None
            else:
                param.grad.detach_().zero_()

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if group["weight_decay"] != 0:
                grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
            if group["momentum"] != 0:
                grads = self._momentum_buffers(params, grads, group["momentum"])
            torch._foreach_add_(params, grads, alpha=-group["lr"])

    def _momentum_buffers(self, params: list[Tensor], grads: list[Tensor], momentum: float) -> list[Tensor]:
        """Each parameter's buffer after this step: momentum * buffer + grad, or the grad on a first step."""
        buffers = [self.state[p].get("momentum_buffer") for p in params]
        if all(b is not None for b in buffers):
            torch._foreach_mul_(buffers, momentum)
            torch._foreach_add_(buffers, grads)
            return buffers
        for i, (param, grad) in enumerate(zip(params, grads)):
            if buffers[i] is None:
                buffers[i] = self.state[param]["momentum_buffer"] = torch.clone(grad).detach()
            else:
                buffers[i].mul_(momentum).add_(grad)
        return buffers

    def state_dict(self) -> dict[str, Any]:
        """torch.optim's layout: parameters by their index over all groups, in order."""
        index = {param: i for i, param in enumerate(self._params())}
        groups = [{**g, "params": [index[p] for p in g["params"]]} for g in self.param_groups]
        state = {index[p]: dict(s) for p, s in self.state.items()}
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Hyperparameters and momentum buffers from `state_dict` (this class's or torch.optim.SGD's), the
        buffers copied to each parameter's device and dtype; the groups' parameters stay this optimizer's."""
        saved_groups = state_dict["param_groups"]
        if [len(g["params"]) for g in saved_groups] != [len(g["params"]) for g in self.param_groups]:
            raise ValueError(
                f"the optimizer state holds groups of {[len(g['params']) for g in saved_groups]} parameters, "
                f"this optimizer has {[len(g['params']) for g in self.param_groups]}"
            )
        saved_ids = [i for g in saved_groups for i in g["params"]]
        by_saved_id = dict(zip(saved_ids, self._params()))
        self.param_groups = [
            {**copy.deepcopy({k: v for k, v in saved.items() if k != "params"}), "params": own["params"]}
            for saved, own in zip(saved_groups, self.param_groups)
        ]
        self.state = defaultdict(dict)
        for saved_id, values in state_dict["state"].items():
            param = by_saved_id[saved_id]
            self.state[param] = {k: _like(param, v) for k, v in values.items()}

    def _params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"]]


def _like(param: Tensor, value: Any) -> Any:
    if isinstance(value, Tensor):
        dtype = param.dtype if value.is_floating_point() else value.dtype
        return value.to(device=param.device, dtype=dtype, copy=True)
    return copy.deepcopy(value)

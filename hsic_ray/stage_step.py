"""The training step of a stage: a contiguous run of layers trained on their local losses in one batched step.

Every layer's forward takes the detached output of the layer below *before* that layer's update, so a
step can run all the stage's forwards first, then every layer's loss as one batched [layers, m, m]
computation (`HSICObjective.stage_losses`), one backward of the summed losses (the inputs are detached,
so no gradient crosses a layer boundary) and one SGD update over the stage's parameters (each keeps its
own momentum buffer, as per-layer optimizers would). The result equals stepping the layers one by one.

The step never reads back to the host: a kernel system that is not positive definite is recorded on the
device (`hsic_ray.solve_failures`) and checked by `check_solves`, where the caller synchronises anyway (log
steps, checkpoints). On CUDA the step is captured as one graph (`hsic_ray.step_graph`). The same class serves
the in-process trainer (one stage holding every layer) and each Ray stage actor.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from hsic_ray.config import OptimConfig
from hsic_ray.objective import HSICObjective, KernelFactors
from hsic_ray.probes import MAX_PROBE_FEATURES, probe_view
from hsic_ray.schedule import LRSchedule
from hsic_ray.sgd import SGD
from hsic_ray.solve_failures import SolveFailures
from hsic_ray.step_graph import CapturedStep

# Columns of the per-layer statistics a step returns.
STAT_NAMES = ("loss", "nhsic_zx", "nhsic_zy")
# On a CPU, eval-mode passes go through the layers in parts whose widest activation fits about this many
# bytes: a conv net's maps for a whole evaluation chunk outgrow the caches (docs/results.md, "Evaluation in
# cache-sized parts on a CPU").
CPU_EVAL_PART_BYTES = 8 * 2**20


def make_sgd(params, cfg: OptimConfig) -> SGD:
    return SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def layer_lr_scales(scale_last: float, layers: range, num_layers: int) -> list[float]:
    """Each of `layers`' learning-rate multiplier among `num_layers` HSIC layers: 1 at layer 0, falling
    geometrically to `scale_last` at the last (hsic.lr_scale_last)."""
    if num_layers < 2:
        return [1.0 for _ in layers]
    return [scale_last ** (i / (num_layers - 1)) for i in layers]


def use_cuda_graphs(setting: str, device: torch.device) -> bool:
    """auto: on CUDA devices; on: required (an error elsewhere); off: never."""
    if setting == "on" and device.type != "cuda":
        raise ValueError(f"train.cuda_graphs=on needs a CUDA device, but this stage runs on {device}; use auto or off")
    return setting == "on" or (setting == "auto" and device.type == "cuda")


def _param_groups(layers: Sequence[nn.Module], lr_scales: Sequence[float] | None, lr: float) -> list:
    """The stage's parameters for SGD: one group, as checkpoints hold, unless layers have their own rates
    (`layer_lr_scales`); then one group per layer."""
    if lr_scales is not None and len(lr_scales) != len(layers):
        raise ValueError(f"{len(lr_scales)} learning-rate scales for a stage of {len(layers)} layers")
    if lr_scales is None or all(scale == 1.0 for scale in lr_scales):
        return [p for layer in layers for p in layer.parameters()]
    return [{"params": list(layer.parameters()), "lr": lr * scale} for layer, scale in zip(layers, lr_scales)]


@contextlib.contextmanager
def _cumulative_batchnorm(layers: Sequence[nn.Module], reset: bool = True) -> Iterator[None]:
    """BatchNorm running statistics made a plain average over the batches the body passes: reset first, or
    (`reset` False) continuing the average an earlier call began."""
    norms = [m for layer in layers for m in layer.modules() if isinstance(m, _BatchNorm)]
    momenta = [m.momentum for m in norms]
    for norm in norms:
        if reset:
            norm.reset_running_stats()  # in place: a captured CUDA graph keeps its buffers
        norm.momentum = None  # a cumulative average over the batches that follow
    try:
        yield
    finally:
        for norm, momentum in zip(norms, momenta):
            norm.momentum = momentum


class StageStep:
    def __init__(
        self,
        layers: Sequence[nn.Module],
        objective: HSICObjective,
        optim_cfg: OptimConfig,
        device: torch.device | str = "cpu",
        cuda_graphs: str = "auto",
        lr_scales: Sequence[float] | None = None,
        schedule: LRSchedule | None = None,
    ):
        """`lr_scales`: each layer's multiplier of optim_cfg.lr (`layer_lr_scales`); None: 1 for every layer.
        `schedule`: the step size's factor at each of this stage's steps; None: constant."""
        self.device = torch.device(device)
        self.layers = [layer.to(self.device) for layer in layers]
        self.objective = objective
        self.optimizer = make_sgd(_param_groups(self.layers, lr_scales, optim_cfg.lr), optim_cfg)
        self.solves = SolveFailures(len(self.layers), self.device)
        self.steps = 0
        # The schedule scales each step's gradient through a device scalar that a captured graph reads at
        # every replay; SGD's lr is a Python number a graph would keep at its capture value. With momentum
        # the step follows the factor within the momentum's horizon (1 / (1 - momentum) steps), which the
        # schedule's hundreds of steps make immaterial; weight decay is not scaled.
        self.schedule = schedule
        self._step_scale = torch.ones((), device=self.device)
        self._graph: CapturedStep | None = None
        self._eval_part: int | None = None  # samples per part of an eval-mode pass (CPU), from the layers' widths
        if self.device.type == "cuda":
            # cuSOLVER's batched Cholesky leaves its status on the device; MAGMA's reads it back to the host.
            torch.backends.cuda.preferred_linalg_library("cusolver")
        if use_cuda_graphs(cuda_graphs, self.device):
            self._graph = CapturedStep(self._step, self.layers, self.optimizer, extra=[self.solves.counts])

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def kernel_dtype(self) -> torch.dtype | None:
        """The precision of the layers' kernels: None for the activations' own, float64 after a failure."""
        return self.solves.kernel_dtype

    def train_step(self, x: Tensor, factors: KernelFactors) -> tuple[Tensor, Tensor]:
        """One local HSIC step of every layer.

        Returns the stage's detached output and a [layers, 3] tensor of (loss, nhsic_zx, nhsic_zy), both on
        the stage's device and possibly still being computed.
        """
        x = x.to(self.device, non_blocking=True)
        factors = factors.to(self.device)
        self.solves.record_factors(factors)
        if self.schedule is not None and not self.schedule.is_constant:
            self._step_scale.fill_(self.schedule.factor(self.steps))
        step = self._graph if self._graph is not None and self._graph.fits(x) else self._step
        out, stats = step(x, factors)
        self.steps += 1
        return out, stats

    def _step(self, x: Tensor, factors: KernelFactors) -> tuple[Tensor, Tensor]:
        outputs = []
        for layer in self.layers:
            z = layer.train()(x)
            outputs.append(z)
            x = z.detach()
        terms = self.objective.stage_losses(outputs, factors, self.kernel_dtype)
        self.optimizer.zero_grad(set_to_none=True)
        (terms.loss.sum() * self._step_scale).backward()
        self.optimizer.step()
        self.solves.record(terms.failed)
        stats = torch.stack([terms.loss.detach(), terms.nhsic_zx, terms.nhsic_zy], dim=1).to(x.dtype)
        return x, stats

    def check_solves(self) -> None:
        """Read the solve failures (a host sync; see `SolveFailures.check`): after float32 failures, continue
        in float64; after float64 failures, or a batch's factors that failed, raise."""
        if self.solves.check() and self._graph is not None:
            self._graph.reset()

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        """Eval-mode output (BatchNorm on running statistics) for evaluation and the format head."""
        return _joined([self._eval(part) for part in self._eval_parts(x)])

    def _eval(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer.eval()(x)
        return x

    def _eval_parts(self, x: Tensor) -> tuple[Tensor, ...]:
        """`x` on the device, in the parts an eval-mode pass takes at a time (samples are independent in eval
        mode): on a CPU, as many samples as keep the widest layer's output within CPU_EVAL_PART_BYTES."""
        x = x.to(self.device, non_blocking=True)
        if self.device.type != "cpu":
            return (x,)
        if self._eval_part is None:
            widest, z = 0, x[:1]
            for layer in self.layers:
                z = layer.eval()(z)
                widest = max(widest, z.numel() * z.element_size())
            self._eval_part = max(1, CPU_EVAL_PART_BYTES // max(widest, 1))
        return x.split(self._eval_part)

    @torch.no_grad()
    def calibrate_batchnorm(self, batches: list[Tensor], reset: bool = True) -> list[Tensor]:
        """Recompute every BatchNorm's running statistics as the plain average over `batches`, with the
        weights as they are now; returns the train-mode outputs, the next stage's batches. With `reset`
        False the average goes on from the batches of the calls before (since the last reset).

        During training the running statistics are moving averages over batches seen by older weights:
        after an epoch they describe a network that no longer exists, and eval-mode outputs (evaluation,
        the format head, the information plane) pay for it. Steps use batch statistics and are unaffected.
        """
        outputs = []
        with _cumulative_batchnorm(self.layers, reset):
            for x in batches:
                x = x.to(self.device, non_blocking=True)
                for layer in self.layers:
                    x = layer.train()(x)
                outputs.append(x)
        return outputs

    @torch.no_grad()
    def layer_outputs(self, x: Tensor, max_features: int = MAX_PROBE_FEATURES) -> tuple[Tensor, list[Tensor]]:
        """Eval-mode output, and every layer's output as its linear probe reads it (`probes.probe_view`, at
        most `max_features` wide: reduced here, so that wide layers never leave the stage's device in full)."""
        parts = [self._views(part, max_features) for part in self._eval_parts(x)]
        outputs = _joined([out for out, _ in parts])
        return outputs, [_joined(layer) for layer in zip(*(views for _, views in parts))]

    def _views(self, x: Tensor, max_features: int) -> tuple[Tensor, list[Tensor]]:
        views = []
        for layer in self.layers:
            x = layer.eval()(x)
            views.append(probe_view(x, max_features))
        return x, views

    @torch.no_grad()
    def measure(self, x: Tensor, factors: KernelFactors) -> tuple[Tensor, Tensor]:
        """Eval-mode output and each layer's (nhsic_zx, nhsic_zy): the information plane on a fixed batch."""
        x = x.to(self.device, non_blocking=True)
        outputs = []
        for layer in self.layers:
            x = layer.eval()(x)
            outputs.append(x)
        return x, self.objective.dependence(outputs, factors.to(self.device))

    def state_dict(self) -> dict[str, Any]:
        self.check_solves()  # a checkpoint never holds weights trained past an unreported failure
        return {
            "layers": [layer.state_dict() for layer in self.layers],
            "optimizer": self.optimizer.state_dict(),
            "kernel_dtype": self.solves.state(),
            "steps": self.steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["layers"]) != len(self.layers):
            raise ValueError(f"checkpoint holds {len(state['layers'])} layers, this stage has {len(self.layers)}")
        for layer, layer_state in zip(self.layers, state["layers"]):
            layer.load_state_dict(layer_state)
        self.optimizer.load_state_dict(state["optimizer"])
        self.solves.load_state(state["kernel_dtype"])
        self.steps = state["steps"]
        if self._graph is not None:
            self._graph.reset()  # the optimizer's momentum buffers are new tensors: capture again


def _joined(parts: Sequence[Tensor]) -> Tensor:
    """The parts of an eval-mode pass as one batch (a lone part as it is: no copy)."""
    return parts[0] if len(parts) == 1 else torch.cat(list(parts))

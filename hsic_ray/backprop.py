"""The backprop baseline: the same network plus the format head, trained end to end with cross-entropy.

In process, same data order and batch size as HSIC training, so the two compare on an equal budget.
Per-layer gradient norms are logged: they show gradients vanishing in deep nets without skip connections.

The pieces of a run (the model, one step, one epoch, test accuracy, the epoch record and the final metrics)
are functions shared by `BackpropTrainer` (in process) and the Ray Train loop (`hsic_ray.train_backprop`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from hsic_ray import evaluation
from hsic_ray.config import ExperimentConfig, TrainConfig
from hsic_ray.data import Batch, ImageData, iterate_batches, num_batches, split_chunks
from hsic_ray.models import LayerwiseNet, build_head
from hsic_ray.run.directory import RunDirectory
from hsic_ray.run.model_io import MODEL_FILE, model_bytes
from hsic_ray.schedule import LRSchedule
from hsic_ray.sgd import SGD
from hsic_ray.stage_step import make_sgd

log = logging.getLogger("hsic_ray")


def layer_grad_norms(net: LayerwiseNet) -> list[float]:
    norms = []
    for layer in net.layers:
        grads = [p.grad.detach().flatten() for p in layer.parameters() if p.grad is not None]
        norms.append(float(torch.cat(grads).norm()) if grads else 0.0)
    return norms


# --- shared pieces ---------------------------------------------------------------------------------------


def build_model(net: LayerwiseNet, num_classes: int) -> nn.Sequential:
    """The network followed by the format head: what backprop trains end to end (model[0] is `net`)."""
    return nn.Sequential(net, build_head(net.output_features, num_classes))


def unwrap(model: nn.Module) -> nn.Module:
    """The model under a DistributedDataParallel wrapper (or the model itself)."""
    return getattr(model, "module", model)


def backprop_step(model: nn.Module, optimizer: SGD, x: torch.Tensor, y: torch.Tensor, weight: float = 1.0) -> float:
    """One SGD step on the mean cross-entropy of (x, y), its gradient scaled by `weight`; returns the loss.

    A data-parallel worker that holds n of a global batch of B samples passes weight = world_size * n / B:
    once DDP averages the gradients over the workers, the step is the one of the whole batch's mean loss.
    """
    model.train()
    loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    (loss if weight == 1.0 else loss * weight).backward()
    optimizer.step()
    return loss.item()


@dataclass
class EpochStats:
    """What one (possibly partial) epoch of backprop did."""

    epoch: int
    steps: int  # total steps after this epoch
    next_batch: int  # batch index to continue from; == total when the epoch ran to its end
    total: int  # full batches in the epoch
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)
    grad_norms: list[list[float]] = field(default_factory=list)  # per step, per layer
    stopped: bool = False  # `stop` ended the epoch early (an interrupt)

    @property
    def complete(self) -> bool:
        return self.next_batch >= self.total

    def mean_loss(self) -> float:
        return sum(self.losses) / max(len(self.losses), 1)

    def mean_grad_norms(self) -> list[float]:
        return torch.tensor(self.grad_norms).mean(0).tolist() if self.grad_norms else []


def whole_batch(batch: Batch) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The in-process shard of a batch: all of it, at weight 1."""
    return batch.x, batch.y, 1.0


def train_epoch(
    model: nn.Module,
    optimizer: SGD,
    net: LayerwiseNet,
    data: ImageData,
    train: TrainConfig,
    epoch: int,
    steps: int,
    device: torch.device,
    start: int = 0,
    shard: Callable[[Batch], tuple[torch.Tensor, torch.Tensor, float]] = whole_batch,
    verbose: bool = True,
    schedule: LRSchedule | None = None,
    stop: Callable[[], bool] | None = None,
) -> EpochStats:
    """Backprop over the batches of `epoch` from batch `start`, stopping at train.max_steps total steps.

    Batches come in the seeded order of `iterate_batches(seed, epoch)`; `shard` picks this process's rows of
    each one (and the gradient weight, see `backprop_step`). Gradient norms are those of `net`'s layers.
    `schedule` sets the learning rate of each step. `stop`, asked before each step, ends the epoch there
    (`stopped`; `next_batch` is the batch not taken).
    """
    total = num_batches(len(data.y_train), train.batch_size)
    stats = EpochStats(epoch=epoch, steps=steps, next_batch=start, total=total)
    started = time.perf_counter()
    for batch in iterate_batches(data.x_train, data.y_train, train.batch_size, train.seed, epoch, start=start):
        if train.max_steps is not None and stats.steps >= train.max_steps:
            break
        if stop is not None and stop():
            stats.stopped = True
            break
        x, y, weight = shard(batch)
        if schedule is not None:
            schedule.apply(optimizer, stats.steps)
        stats.losses.append(backprop_step(model, optimizer, x.to(device), y.to(device), weight))
        stats.grad_norms.append(layer_grad_norms(net))
        stats.steps += 1
        stats.next_batch = batch.index + 1
        if verbose and ((batch.index + 1) % train.log_every == 0 or batch.index + 1 == total):
            log.info(
                "backprop epoch %d/%d  batch %d/%d  loss %.4f",
                epoch,
                train.epochs,
                batch.index + 1,
                total,
                stats.losses[-1],
            )
    stats.seconds = time.perf_counter() - started
    return stats


@torch.no_grad()
def test_accuracy(model: nn.Module, data: ImageData, device: torch.device) -> float:
    """Accuracy (%) of `model`'s logits on the test split, in chunks; leaves the model in eval mode."""
    model.eval()
    logits = torch.cat([model(chunk.to(device)).cpu() for chunk in split_chunks(data.x_test)])
    return evaluation.accuracy(logits, data.y_test)


def epoch_record(stats: EpochStats, accuracy: float) -> dict[str, Any]:
    """The metrics.jsonl line of an epoch."""
    return {
        "kind": "epoch",
        "epoch": stats.epoch,
        "step": stats.steps,
        "loss": stats.mean_loss(),
        "grad_norms": stats.mean_grad_norms(),
        "test_accuracy": accuracy,
    }


def final_metrics(record: dict[str, Any], train_seconds: float, steps: int, batch_size: int) -> dict[str, Any]:
    """metrics.json of a backprop run, from its last epoch record: the HSIC job's keys where they apply."""
    return {
        "test_accuracy_formatted": record["test_accuracy"],
        "test_accuracy_unformatted": None,
        "train_seconds": train_seconds,
        "steps": steps,
        "samples_per_second": steps * batch_size / max(train_seconds, 1e-9),
        "epochs": record["epoch"],
        "grad_norms": record["grad_norms"],
    }


def model_file(cfg: ExperimentConfig, data: ImageData, model_state: dict[str, Any]) -> bytes:
    """model.pt of a backprop run, from the state dict of `build_model`'s Sequential (network "0.", head "1.")."""
    part = lambda prefix: {k[len(prefix) :]: v for k, v in model_state.items() if k.startswith(prefix)}  # noqa: E731
    return model_bytes(cfg, "backprop", data.input_shape, data.num_classes, part("0."), part("1."))


# --- in process ------------------------------------------------------------------------------------------


class BackpropTrainer:
    def __init__(self, cfg: ExperimentConfig, data: ImageData, net: LayerwiseNet, run: RunDirectory | None, device):
        self.cfg, self.data, self.net, self.run = cfg, data, net, run
        self.device = torch.device(device)
        self.model = build_model(net, data.num_classes).to(self.device)
        self.optimizer = make_sgd(self.model.parameters(), cfg.backprop)
        self.schedule = LRSchedule.for_run(cfg.backprop, cfg.train, len(data.y_train))
        self.steps = 0
        self.train_seconds = 0.0

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        stats = train_epoch(
            self.model,
            self.optimizer,
            self.net,
            self.data,
            self.cfg.train,
            epoch,
            self.steps,
            self.device,
            schedule=self.schedule,
        )
        self.steps = stats.steps
        self.train_seconds += stats.seconds
        return epoch_record(stats, self.test_accuracy())

    def test_accuracy(self) -> float:
        return test_accuracy(self.model, self.data, self.device)

    def fit(self, on_epoch: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Train every epoch; `on_epoch`, if given, receives each epoch's record plus the training time so far."""
        record: dict[str, Any] = {}
        for epoch in range(1, self.cfg.train.epochs + 1):
            record = self.train_epoch(epoch)
            if self.run is not None:
                self.run.append_jsonl("metrics.jsonl", record)
            log.info(
                "backprop epoch %d: loss %.4f, test accuracy %.2f%%", epoch, record["loss"], record["test_accuracy"]
            )
            if on_epoch is not None:
                on_epoch({**record, "train_seconds": self.train_seconds})
            if self.cfg.train.max_steps is not None and self.steps >= self.cfg.train.max_steps:
                break
        metrics = final_metrics(record, self.train_seconds, self.steps, self.cfg.train.batch_size)
        if self.run is not None:
            self.run.write_bytes(MODEL_FILE, model_file(self.cfg, self.data, self.model.state_dict()))
            self.run.write_json("metrics.json", metrics)  # last: it marks the run finished
        return metrics

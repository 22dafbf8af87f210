"""The backprop baseline: the same network plus the format head, trained end to end with cross-entropy.

In process, same data order and batch size as HSIC training, so the two compare on an equal budget.
Per-layer gradient norms are logged: they show gradients vanishing in deep nets without skip connections.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from hsic_ray import evaluation
from hsic_ray.config import ExperimentConfig
from hsic_ray.data import ImageData, iterate_batches, num_batches, to_tensor
from hsic_ray.models import LayerwiseNet, build_head
from hsic_ray.run_dir import RunDirectory
from hsic_ray.stage import make_sgd
from hsic_ray.trainer import EVAL_CHUNK

log = logging.getLogger("hsic_ray")


def layer_grad_norms(net: LayerwiseNet) -> list[float]:
    norms = []
    for layer in net.layers:
        grads = [p.grad.detach().flatten() for p in layer.parameters() if p.grad is not None]
        norms.append(float(torch.cat(grads).norm()) if grads else 0.0)
    return norms


class BackpropTrainer:
    def __init__(self, cfg: ExperimentConfig, data: ImageData, net: LayerwiseNet, run: RunDirectory | None, device):
        self.cfg, self.data, self.net, self.run = cfg, data, net, run
        self.device = torch.device(device)
        self.model = nn.Sequential(net, build_head(net.output_features, data.num_classes)).to(self.device)
        self.optimizer = make_sgd(self.model.parameters(), cfg.backprop)
        self.steps = 0
        self.train_seconds = 0.0

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        self.model.train()
        loss = F.cross_entropy(self.model(x.to(self.device)), y.to(self.device))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.steps += 1
        return loss.item()

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        train = self.cfg.train
        total = num_batches(len(self.data.y_train), train.batch_size)
        started = time.perf_counter()
        losses, grad_norms = [], []
        for batch in iterate_batches(self.data.x_train, self.data.y_train, train.batch_size, train.seed, epoch):
            if train.max_steps is not None and self.steps >= train.max_steps:
                break
            losses.append(self.step(batch.x, batch.y))
            grad_norms.append(layer_grad_norms(self.net))
            if (batch.index + 1) % train.log_every == 0 or batch.index + 1 == total:
                log.info("backprop epoch %d/%d  batch %d/%d  loss %.4f", epoch, train.epochs, batch.index + 1, total, losses[-1])
        self.train_seconds += time.perf_counter() - started
        mean_norms = torch.tensor(grad_norms).mean(0).tolist() if grad_norms else []
        return {"kind": "epoch", "epoch": epoch, "step": self.steps, "loss": sum(losses) / max(len(losses), 1),
                "grad_norms": mean_norms, "test_accuracy": self.test_accuracy()}  # fmt: skip

    @torch.no_grad()
    def test_accuracy(self) -> float:
        self.model.eval()
        x = self.data.x_test
        logits = torch.cat([self.model(to_tensor(x[i : i + EVAL_CHUNK]).to(self.device)).cpu()
                            for i in range(0, len(x), EVAL_CHUNK)])  # fmt: skip
        return evaluation.accuracy(logits, self.data.y_test)

    def fit(self) -> dict[str, Any]:
        record: dict[str, Any] = {}
        for epoch in range(1, self.cfg.train.epochs + 1):
            record = self.train_epoch(epoch)
            if self.run is not None:
                self.run.append_jsonl("metrics.jsonl", record)
            log.info("backprop epoch %d: loss %.4f, test accuracy %.2f%%", epoch, record["loss"], record["test_accuracy"])
            if self.cfg.train.max_steps is not None and self.steps >= self.cfg.train.max_steps:
                break
        metrics = {
            "test_accuracy_formatted": record["test_accuracy"],
            "test_accuracy_unformatted": None,
            "train_seconds": self.train_seconds,
            "steps": self.steps,
            "samples_per_second": self.steps * self.cfg.train.batch_size / max(self.train_seconds, 1e-9),
            "epochs": record["epoch"],
            "grad_norms": record["grad_norms"],
        }
        if self.run is not None:
            self.run.write_json("metrics.json", metrics)
        return metrics

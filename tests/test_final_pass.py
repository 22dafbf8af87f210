"""The end of a run's one pass over each split gives what separate passes would: every sample's output, in
the split's order, and the same final probes."""

import functools

import pytest
import torch

from hsic_ray import probes
from hsic_ray.config import build_config
from hsic_ray.data import split_chunks
from hsic_ray.experiment import build_seeded_network
from hsic_ray.final_pass import FinalPass
from hsic_ray.local_pipeline import LocalPipeline
from hsic_ray.objective import HSICObjective
from hsic_ray.timeline import Timeline


def read_network(digits, **train):
    overrides = {"model.depth": 2, "model.width": 24, "train.final_probe_samples": 700}
    cfg = build_config("paper_mlp", overrides={**overrides, **{f"train.{k}": v for k, v in train.items()}})
    net = build_seeded_network(cfg, digits)
    pipeline = LocalPipeline(net, HSICObjective(cfg.hsic, 10), cfg.optim, "cpu")
    final_pass = FinalPass(cfg.train, digits, pipeline, net.output_features, Timeline())
    return final_pass, final_pass.read(), pipeline


def separate_outputs(pipeline, x):
    return torch.cat([out.flatten(1) for out in pipeline.forward_chunks(split_chunks(x))])


def separate_probes(final_pass, digits, max_features):
    subset = final_pass.probe_indices
    layer_outputs = functools.partial(final_pass.pipeline.layer_outputs, max_features=max_features)
    train, test = (digits.x_train[subset], digits.y_train[subset]), (digits.x_test, digits.y_test)
    return probes.probe_layers(layer_outputs, train, test, 10)


@pytest.mark.parametrize("kept_bytes", [probes.KEEP_BYTES, 0])  # 0: every fitted view read again to be scored
def test_one_pass_gives_what_separate_passes_give(digits, monkeypatch, kept_bytes):
    monkeypatch.setattr(probes, "KEEP_BYTES", kept_bytes)
    final_pass, network, pipeline = read_network(digits)
    assert final_pass.shared and len(final_pass.probe_indices) == 700
    assert torch.allclose(network.train_features, separate_outputs(pipeline, digits.x_train), atol=1e-6)
    assert torch.allclose(network.test_features, separate_outputs(pipeline, digits.x_test), atol=1e-6)
    expected = separate_probes(final_pass, digits, max_features=2048)
    assert {**network.probes, "seconds": 0} == {**expected, "seconds": 0}
    assert expected["test_accuracy"][0] > 50  # a real probe of the real digits, not an empty one
    phases = final_pass.timeline.seconds
    assert phases["final_evaluation"] > 0 and phases["final_probes"] > 0


def test_an_output_wider_than_a_probe_reads_is_passed_on_its_own(digits):
    final_pass, network, pipeline = read_network(digits, probe_features=4)  # paper_mlp's output: 10 wide
    assert not final_pass.shared
    assert torch.allclose(network.train_features, separate_outputs(pipeline, digits.x_train), atol=1e-6)
    assert network.train_features.shape == (2000, 10)
    expected = separate_probes(final_pass, digits, max_features=4)
    assert {**network.probes, "seconds": 0} == {**expected, "seconds": 0}


def test_without_probes_only_the_outputs(digits):
    final_pass, network, pipeline = read_network(digits, probe_samples=0)
    assert network.probes is None and "final_probes" not in final_pass.timeline.seconds
    assert torch.allclose(network.test_features, separate_outputs(pipeline, digits.x_test), atol=1e-6)

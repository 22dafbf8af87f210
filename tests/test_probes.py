"""Linear probes of every layer: the closed-form fit, the reduction of wide layers, and a real run."""

import json

import numpy as np
import pytest
import torch

from hsic_ray import probes
from hsic_ray.config import build_config
from hsic_ray.evaluation import RidgeClassifier
from hsic_ray.experiment import run_hsic
from hsic_ray.models import build_network
from hsic_ray.objective import HSICObjective
from hsic_ray.probes import MAX_PROBE_FEATURES, probe_layers, probe_view
from hsic_ray.run.plots import plot_probes
from hsic_ray.stage_step import StageStep


def _coded_classes(rng, n, dims=32):
    """Classes coded along random directions plus noise: linearly separable, though no unit is a class."""
    labels = rng.integers(0, 10, n)
    return np.eye(10)[labels] @ rng.normal(size=(10, dims)) + 0.3 * rng.normal(size=(n, dims)) + 50, labels


def test_probe_fit_reads_separable_features_and_not_noise(monkeypatch):
    rng = np.random.default_rng(0)
    features, labels = _coded_classes(rng, 3000)
    noise = rng.normal(size=(3000, 32))
    images = np.arange(3000, dtype=np.float32)  # stand-ins for images: the "network" looks its layers up by index
    calls = []

    def layer_outputs(chunks):
        for x in chunks:
            calls.append(len(x))
            idx = x.long().numpy()
            yield [torch.from_numpy(features[idx]).float(), torch.from_numpy(noise[idx]).float()]

    def probe():
        calls.clear()
        return probe_layers(
            layer_outputs, (images[:2000], labels[:2000]), (images[2000:], labels[2000:]), 10, chunk=300
        )

    result = probe()
    separable_train, noise_train = result["train_accuracy"]
    separable_test, noise_test = result["test_accuracy"]
    assert separable_train > 99 and separable_test > 99
    assert noise_test < 16  # chance is 10%
    assert noise_train > noise_test + 3  # 32 features of noise: the fit learns its own training set a little
    assert (result["train_samples"], result["test_samples"]) == (2000, 1000)
    assert len(calls) == 7 + 4  # the training views were kept for scoring: one pass over each split
    # Views beyond the memory budget go through the network again, and give the same figures.
    monkeypatch.setattr(probes, "KEEP_BYTES", 3 * 300 * 32 * 4 * 2)
    assert probe() == result and len(calls) == 7 + 4 + 4


def test_a_classifier_fitted_chunk_by_chunk_agrees_with_one_fitted_at_once():
    rng = np.random.default_rng(1)
    features, labels = _coded_classes(rng, 1000)
    features[:, 3] = 7.0  # a constant feature (a dead unit) must not blow the standardisation up
    whole = RidgeClassifier(10)
    whole.add(features, labels)
    chunked = RidgeClassifier(10)
    for i in range(0, 1000, 128):
        chunked.add(features[i : i + 128], labels[i : i + 128])
    scores, chunked_scores = whole.fit().predict(features), chunked.fit().predict(features)
    # Each chunk's products are float32: the two agree to float32's precision, and on every class chosen.
    assert torch.allclose(chunked_scores, scores, atol=1e-5)
    assert torch.equal(chunked_scores.argmax(1), scores.argmax(1))
    assert scores.abs().max() < 10


def test_wide_layers_are_reduced_the_same_way_everywhere():
    torch.manual_seed(0)
    conv = torch.randn(6, 64, 14, 14)  # resconv's layers: 12,544 features
    pooled = probe_view(conv)
    assert pooled.shape == (6, 64 * 5 * 5)
    assert torch.allclose(pooled[:, :25].reshape(6, 5, 5).mean((1, 2)), conv[:, 0].mean((1, 2)), atol=0.1)
    dense = torch.randn(6, 4096)
    projected = probe_view(dense)
    assert projected.shape == (6, MAX_PROBE_FEATURES) and torch.equal(projected, probe_view(dense.clone()))
    # A random projection keeps distances about intact (Johnson-Lindenstrauss): linear structure survives.
    ratio = torch.cdist(projected, projected)[0, 1:] / torch.cdist(dense, dense)[0, 1:]
    assert ((ratio > 0.9) & (ratio < 1.1)).all()
    narrow = torch.randn(6, 8, 4, 4)
    assert torch.equal(probe_view(narrow), narrow.flatten(1))  # 128 features: read as they are


def test_a_stage_reads_its_layers_at_most_probe_features_wide():
    cfg = build_config("deep_conv", overrides={"model.depth": 2, "model.width": 8, "model.last_width": 128})
    net = build_network(cfg.model, (1, 28, 28))
    stage = StageStep(list(net.layers), HSICObjective(cfg.hsic, 10), cfg.optim)
    x = torch.rand(5, 1, 28, 28)
    # Stem and first stage 8 x 28 x 28, second stage 16 x 14 x 14, pooled to the finest square grid that fits;
    # the 128-wide last layer as it is.
    for bound, widths in [(2048, [8 * 16**2, 8 * 16**2, 16 * 11**2, 128]), (200, [8 * 5**2, 8 * 5**2, 16 * 3**2, 128])]:
        out, views = stage.layer_outputs(x, bound)
        assert [v.shape[1] for v in views] == widths
        assert torch.equal(views[-1], out)


def records(run, kind):
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def test_a_run_probes_every_layer_each_epoch_and_at_the_end(tmp_path, digits):
    overrides = {
        "trainer": "local",
        "output": str(tmp_path / "run"),
        "model.depth": 2,
        "model.width": 64,
        "train.batch_size": 128,
        "train.epochs": 2,
        "train.max_steps": 20,
        "head.epochs": 1,
        "train.eval_samples": 128,
        "train.probe_samples": 800,
        "train.monitor_every": 1,
    }
    summaries = []
    metrics = run_hsic(build_config("paper_mlp", overrides=overrides), digits, on_epoch=summaries.append)
    run = tmp_path / "run"
    per_epoch = records(run, "probes")
    assert [r["epoch"] for r in per_epoch] == [0, 1, 2]  # before training, then after each epoch
    for r in per_epoch:
        assert (r["train_samples"], r["test_samples"]) == (800, 400)  # the fixed subsets
        assert len(r["train_accuracy"]) == len(r["test_accuracy"]) == 4
        assert all(0 <= a <= 100 for a in r["train_accuracy"] + r["test_accuracy"])
    final = json.loads((run / "metrics.json").read_text())["probes"]
    assert final == json.loads(json.dumps(metrics["probes"]))
    assert (final["train_samples"], final["test_samples"]) == (2000, 1000)  # the full splits
    assert final["test_accuracy"][0] > 80  # chance is 10%: the first layer of 64 units holds the digits
    # The last layer's probe is the least-squares readout the epoch summary fits on the network's output.
    assert final["test_accuracy"][-1] == pytest.approx(summaries[-1]["test_accuracy_least_squares"], abs=0.1)
    assert (run / "probes.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_final_probes_fit_a_fixed_subset_of_a_large_training_split(tmp_path, digits):
    overrides = {
        "trainer": "local",
        "model.depth": 1,
        "model.width": 32,
        "train.max_steps": 4,
        "head.epochs": 1,
        "train.eval_samples": 64,
        "train.probe_samples": 200,
        "train.final_probe_samples": 500,
    }
    finals = [
        run_hsic(build_config("paper_mlp", overrides={**overrides, "output": str(tmp_path / run)}), digits)["probes"]
        for run in ("a", "b")
    ]
    assert (finals[0]["train_samples"], finals[0]["test_samples"]) == (500, 1000)  # every test sample
    assert {**finals[0], "seconds": 0} == {**finals[1], "seconds": 0}  # the same subset every time


def test_probe_samples_zero_turns_probes_off(tmp_path, digits):
    overrides = {
        "trainer": "local",
        "output": str(tmp_path / "run"),
        "model.depth": 1,
        "model.width": 16,
        "train.max_steps": 2,
        "head.epochs": 1,
        "train.eval_samples": 64,
        "train.probe_samples": 0,
    }
    metrics = run_hsic(build_config("paper_mlp", overrides=overrides), digits)
    assert "probes" not in metrics and not records(tmp_path / "run", "probes")
    assert not (tmp_path / "run" / "probes.png").exists()


def test_probe_plot_stays_readable_for_52_layers(tmp_path):
    from matplotlib.image import imread

    rng = np.random.default_rng(0)
    epochs = [{"epoch": e, "test_accuracy": list(90 - rng.random(52) * e)} for e in range(16)]
    final = {"test_accuracy": [80.0] * 52, "train_accuracy": [85.0] * 52}
    plot_probes(epochs, tmp_path / "probes.png", "deep", final)
    assert imread(str(tmp_path / "probes.png")).shape[:2] == (500, 700)
    with pytest.raises(ValueError, match="same layers"):
        plot_probes(epochs, tmp_path / "bad.png", final={"test_accuracy": [1.0] * 3})
    with pytest.raises(ValueError, match="nothing to plot"):
        plot_probes([], tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()

"""data.source=cifar10 through the real loading code (hsic_ray.data.sources -> torchvision.datasets.CIFAR10) on a
small archive written here in torchvision's on-disk format, then 3 x 32 x 32 images through every architecture:
shapes, a few HSIC steps in process, and the saved model reproducing the run's predictions."""

import os
import pickle

import numpy as np
import pytest
import torch
import torchvision.datasets.cifar

import hsic_ray
from hsic_ray.config import build_config
from hsic_ray.data import DataError, load_dataset, to_tensor
from hsic_ray.evaluation import accuracy
from hsic_ray.experiment import run_hsic
from hsic_ray.models import build_network

PER_BATCH, TEST = 64, 100  # five training batches of 64 samples: 320 training images


def write_cifar10(root, seed=0) -> dict[str, np.ndarray]:
    """cifar-10-batches-py/ as torchvision unpacks it: pickled dicts of uint8 rows (the red, green and blue
    32 x 32 planes one after another) and their labels, and batches.meta with the class names."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    written = {"x_train": [], "y_train": []}
    for name, n in [*((f"data_batch_{i}", PER_BATCH) for i in range(1, 6)), ("test_batch", TEST)]:
        labels = np.arange(n) % 10
        rng.shuffle(labels)
        # Each class a different mean colour plus noise: learnable in a few steps, and any channel or axis mixup
        # in the loader shows in the comparison below.
        rows = rng.integers(0, 80, (n, 3 * 32 * 32)) + 17 * labels[:, None]
        entry = {"batch_label": name, "labels": labels.tolist(), "data": rows.astype(np.uint8), "filenames": []}
        (folder / name).write_bytes(pickle.dumps(entry))
        split = "test" if name == "test_batch" else "train"
        written.setdefault(f"x_{split}", []).append(entry["data"].reshape(n, 3, 32, 32))
        written.setdefault(f"y_{split}", []).append(labels)
    meta = {"label_names": [f"class{i}" for i in range(10)], "num_cases_per_batch": PER_BATCH, "num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta))
    return {key: np.concatenate(parts) for key, parts in written.items()}


@pytest.fixture
def cifar_root(tmp_path, monkeypatch):
    """A synthetic archive, and torchvision told to accept its files. With download=False torchvision still
    compares every file's md5 with the real archive's (`_check_integrity`, `_load_meta`), which no synthetic
    file can match: only that comparison is replaced, by a check that the file exists. The project's loading
    code, and torchvision's reading of the pickles, run as they are."""
    root = tmp_path / "data"
    written = write_cifar10(root)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda path, md5=None: os.path.isfile(path))
    return root, written


def cifar_config(root, out=None, preset="paper_mlp", **extra):
    overrides = {"data.source": "cifar10", "data.root": str(root), "data.download": False, "output": out, **extra}
    return build_config(preset, overrides={k: v for k, v in overrides.items() if v is not None})


def test_without_the_md5_bypass_torchvision_refuses_the_synthetic_archive(tmp_path):
    # Why the fixture patches anything: the real check rejects these files, and the loader says what to do.
    write_cifar10(tmp_path)
    with pytest.raises(DataError, match="cifar-10-batches-py"):
        load_dataset(cifar_config(tmp_path).data)


def test_the_real_loader_reads_the_archive_as_n_by_3_by_32_by_32(cifar_root):
    root, written = cifar_root
    data = load_dataset(cifar_config(root).data)
    assert data.x_train.shape == (5 * PER_BATCH, 3, 32, 32) and data.x_test.shape == (TEST, 3, 32, 32)
    assert data.num_classes == 10 and data.input_shape == (3, 32, 32)
    for key in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(data, key), written[key])


@pytest.mark.parametrize("arch, flat", [("conv", None), ("resconv", 8 * 16 * 16), ("mlp", 3 * 32 * 32)])
def test_every_architecture_takes_3_channel_32_by_32_images(arch, flat):
    net = build_network(
        build_config(overrides={"model.arch": arch, "model.depth": 2, "model.width": 8}).model, (3, 32, 32)
    )
    assert net.shapes[0] == (3, 32, 32) and net.shapes[-1] == (10,)
    first = net.layers[0][1] if arch == "mlp" else net.layers[0][0]
    assert (first.in_features if arch == "mlp" else first.in_channels) == (flat if arch == "mlp" else 3)
    if arch == "resconv":
        assert net.layers[-1][1].in_features == flat
    if arch == "conv":
        assert net.shapes[1:-1] == [(8, 32, 32), (8, 32, 32), (16, 16, 16)]
    assert net(torch.rand(4, 3, 32, 32)).shape == (4, 10)


ARCHS = {
    "conv": {"model.arch": "conv", "model.depth": 2, "model.width": 4},
    "resconv": {"model.arch": "resconv", "model.depth": 1, "model.width": 4, "model.last_width": 16},
    "mlp": {"model.arch": "mlp", "model.depth": 1, "model.width": 64},
}


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_hsic_trains_on_cifar10_and_the_saved_model_gives_the_same_predictions(tmp_path, cifar_root, arch):
    root, written = cifar_root
    out = tmp_path / "run"
    training = {
        "trainer": "local",
        "train.batch_size": 64,
        "train.epochs": 1,
        "train.max_steps": 3,
        "train.eval_samples": 64,
        "train.probe_samples": 64,
        "train.bn_calibration_batches": 2,
        "head.epochs": 2,
        "train.log_every": 1,
    }
    cfg = cifar_config(root, str(out), **training, **ARCHS[arch])
    metrics = run_hsic(cfg)  # loads the archive itself, through load_dataset
    assert metrics["steps"] == 3 and len(metrics["per_layer"]) == cfg.num_hsic_layers
    assert all(np.isfinite(layer["nhsic_zy"]) for layer in metrics["per_layer"])
    model = hsic_ray.load_model(out)
    images = torch.from_numpy(written["x_test"])  # raw uint8 N x 3 x 32 x 32, as the archive holds them
    with torch.no_grad():
        logits = model(images)
        assert torch.equal(model(to_tensor(written["x_test"])), logits)  # uint8 scaled like the data pipeline
    assert logits.shape == (TEST, 10)
    assert accuracy(logits, written["y_test"]) == metrics["test_accuracy_formatted"]

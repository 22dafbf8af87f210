"""hsic_ray.data: real files (tmp_path and the bundled digits), no mocks."""

from __future__ import annotations

import hashlib
import importlib.resources
import struct
from collections import Counter

import numpy as np
import pytest
import torch

from hsic_ray.config import DataConfig
from hsic_ray.data import (
    Batch,
    DataError,
    ImageData,
    check_arrays,
    epoch_permutation,
    iterate_batches,
    load_dataset,
    main,
    num_batches,
    stratified_split,
    to_tensor,
    write_parquet,
)


@pytest.fixture(scope="module")
def bundled():
    with (importlib.resources.files("hsic_ray") / "assets" / "mnist-10k.npz").open("rb") as fh:
        with np.load(fh) as archive:
            return archive["images"], archive["labels"]


@pytest.fixture(scope="module")
def sample() -> ImageData:
    return load_dataset(DataConfig(source="mnist-sample"))


def _digests(x: np.ndarray, y: np.ndarray) -> list[str]:
    return [hashlib.sha1(img.tobytes() + bytes([int(lbl)])).hexdigest() for img, lbl in zip(x, y)]


def _arrays(n_train=12, n_test=6, shape=(1, 4, 4), dtype=np.uint8, seed=0):
    rng = np.random.default_rng(seed)
    if dtype == np.uint8:
        x_tr = rng.integers(0, 256, (n_train, *shape), dtype=np.uint8)
        x_te = rng.integers(0, 256, (n_test, *shape), dtype=np.uint8)
    else:
        x_tr = rng.random((n_train, *shape), dtype=np.float32)
        x_te = rng.random((n_test, *shape), dtype=np.float32)
    return x_tr, np.arange(n_train) % 3, x_te, np.arange(n_test) % 3


# --- the bundled digits and their split -----------------------------------------------------------------


def test_mnist_sample_split_sizes_and_layout(sample):
    assert sample.name == "mnist-sample"
    assert sample.x_train.shape == (8000, 1, 28, 28) and sample.x_test.shape == (2000, 1, 28, 28)
    assert sample.x_train.dtype == np.uint8 and sample.y_train.dtype == np.int64 and sample.y_test.dtype == np.int64
    assert sample.input_shape == (1, 28, 28)
    assert sample.num_classes == 10
    assert sample.x_train.flags.c_contiguous and sample.x_test.flags.c_contiguous


def test_mnist_sample_split_is_stratified(sample, bundled):
    _, labels = bundled
    overall = np.bincount(labels, minlength=10) / len(labels)
    test_share = np.bincount(sample.y_test, minlength=10) / len(sample.y_test)
    train_share = np.bincount(sample.y_train, minlength=10) / len(sample.y_train)
    assert np.abs(test_share - overall).max() < 0.01
    assert np.abs(train_share - overall).max() < 0.01
    # The file is sorted by label: the split must not be positional, nor come back sorted.
    assert len(np.unique(sample.y_test[:200])) == 10
    assert len(np.unique(sample.y_train[:200])) == 10


def test_mnist_sample_split_is_deterministic_disjoint_and_complete(sample, bundled):
    images, labels = bundled
    again = load_dataset(DataConfig(source="mnist-sample", split_seed=1234))
    assert np.array_equal(again.x_train, sample.x_train) and np.array_equal(again.y_test, sample.y_test)

    train_idx, test_idx = stratified_split(labels, 0.2, 1234)
    assert len(np.intersect1d(train_idx, test_idx)) == 0
    assert np.array_equal(np.sort(np.concatenate([train_idx, test_idx])), np.arange(10_000))
    assert np.array_equal(sample.x_test, images[test_idx][:, None])

    # The same, by content: train + test hold exactly the 10,000 samples of the file.
    train_h, test_h = _digests(sample.x_train, sample.y_train), _digests(sample.x_test, sample.y_test)
    assert Counter(train_h) + Counter(test_h) == Counter(_digests(images[:, None], labels))
    unique_in_file = {h for h, c in Counter(_digests(images, labels)).items() if c == 1}
    assert not (set(train_h) & set(test_h) & unique_in_file)


def test_mnist_sample_split_follows_seed_and_fraction(sample):
    other = load_dataset(DataConfig(source="mnist-sample", split_seed=7))
    assert not np.array_equal(other.y_test, sample.y_test)
    wide = load_dataset(DataConfig(source="mnist-sample", test_fraction=0.3))
    assert (len(wide.x_train), len(wide.x_test)) == (7000, 3000)
    with pytest.raises(DataError, match=r"test_fraction=1\.5.*\(0, 1\)"):
        load_dataset(DataConfig(source="mnist-sample", test_fraction=1.5))


def test_stratified_split_hits_the_exact_total_with_odd_counts():
    labels = np.repeat(np.arange(7), [3, 5, 7, 11, 13, 17, 19])  # 75 samples
    train, test = stratified_split(labels, 0.25, 0)
    assert len(test) == round(75 * 0.25) and len(train) + len(test) == 75
    assert abs(np.bincount(labels[test], minlength=7) - np.bincount(labels, minlength=7) * 0.25).max() < 1


def test_unknown_source():
    with pytest.raises(DataError, match=r"data.source='imagenet' is unknown.*npz:PATH or parquet:URI"):
        load_dataset(DataConfig(source="imagenet"))


# --- epochs and batches ----------------------------------------------------------------------------------


def test_epoch_permutation_is_seeded_per_epoch():
    p = epoch_permutation(1000, seed=3, epoch=0)
    assert np.array_equal(np.sort(p), np.arange(1000))
    assert np.array_equal(p, epoch_permutation(1000, seed=3, epoch=0))
    assert not np.array_equal(p, epoch_permutation(1000, seed=3, epoch=1))
    assert not np.array_equal(p, epoch_permutation(1000, seed=4, epoch=0))
    assert np.array_equal(epoch_permutation(50, seed=-5, epoch=2), epoch_permutation(50, seed=-5, epoch=2))


def test_num_batches_drops_the_last_partial_batch():
    assert num_batches(1000, 256) == 3
    assert num_batches(1024, 256) == 4
    assert num_batches(10, 256) == 0
    with pytest.raises(ValueError, match="batch_size=0"):
        num_batches(10, 0)


def test_iterate_batches_is_deterministic_full_and_disjoint():
    n, bs = 103, 10
    x = np.arange(n, dtype=np.uint8).reshape(n, 1, 1, 1)
    y = np.arange(n) % 10
    batches = list(iterate_batches(x, y, bs, seed=1, epoch=0))
    assert len(batches) == 10  # 3 left over are dropped
    assert all(isinstance(b, Batch) and b.epoch == 0 for b in batches)
    assert [b.index for b in batches] == list(range(10))
    assert all(b.x.shape == (bs, 1, 1, 1) and b.x.dtype == torch.float32 and b.y.dtype == torch.int64 for b in batches)
    seen = np.concatenate([np.rint(b.x.numpy().ravel() * 255).astype(int) for b in batches])
    assert len(set(seen)) == 100
    assert np.array_equal(seen, epoch_permutation(n, 1, 0)[:100])
    # Labels travel with their images.
    assert all(np.array_equal(np.rint(b.x.numpy().ravel() * 255).astype(int) % 10, b.y.numpy()) for b in batches)

    same = list(iterate_batches(x, y, bs, seed=1, epoch=0))
    assert all(torch.equal(a.x, b.x) and torch.equal(a.y, b.y) for a, b in zip(batches, same))
    other_epoch = list(iterate_batches(x, y, bs, seed=1, epoch=1))
    assert not all(torch.equal(a.x, b.x) for a, b in zip(batches, other_epoch))


def test_iterate_batches_resumes_at_start():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (64, 1, 3, 3), dtype=np.uint8)
    y = rng.integers(0, 5, 64)
    full = list(iterate_batches(x, y, 8, seed=9, epoch=4))
    resumed = list(iterate_batches(x, y, 8, seed=9, epoch=4, start=5))
    assert [b.index for b in resumed] == [5, 6, 7]
    assert all(
        torch.equal(a.x, b.x) and torch.equal(a.y, b.y) and a.index == b.index for a, b in zip(full[5:], resumed)
    )
    assert list(iterate_batches(x, y, 8, seed=9, epoch=4, start=8)) == []
    with pytest.raises(ValueError, match="start=9"):
        list(iterate_batches(x, y, 8, seed=9, epoch=4, start=9))


def test_iterate_batches_without_shuffle_and_too_small():
    x = np.arange(20, dtype=np.uint8).reshape(20, 1, 1, 1)
    batches = list(iterate_batches(x, np.zeros(20, dtype=np.int64), 6, seed=0, epoch=0, shuffle=False))
    assert len(batches) == 3
    assert np.array_equal(np.rint(batches[1].x.numpy().ravel() * 255), np.arange(6, 12))
    with pytest.raises(DataError, match="no full batch of batch_size=32.*at most 20"):
        list(iterate_batches(x, np.zeros(20, dtype=np.int64), 32, seed=0, epoch=0))
    with pytest.raises(DataError, match="20 images but 19 labels"):
        list(iterate_batches(x, np.zeros(19, dtype=np.int64), 4, seed=0, epoch=0))


def test_to_tensor_ranges():
    x = np.arange(256, dtype=np.uint8).reshape(1, 1, 16, 16)
    t = to_tensor(x)
    assert t.dtype == torch.float32 and t.shape == (1, 1, 16, 16)
    assert t.min().item() == 0.0 and t.max().item() == 1.0
    assert torch.equal(t, torch.from_numpy(x).float() / 255)
    f = np.linspace(0, 1, 12, dtype=np.float64).reshape(3, 1, 2, 2)
    tf = to_tensor(f)
    assert tf.dtype == torch.float32 and torch.allclose(tf, torch.from_numpy(f).float())
    readonly = np.zeros((2, 1, 2, 2), dtype=np.float32)
    readonly.flags.writeable = False
    assert to_tensor(readonly).shape == (2, 1, 2, 2)
    with pytest.raises(DataError, match="dtype int32"):
        to_tensor(np.zeros((2, 1, 2, 2), dtype=np.int32))


def test_batches_of_the_bundled_digits_are_in_unit_range(sample):
    b = next(iterate_batches(sample.x_train, sample.y_train, 256, seed=0, epoch=0))
    assert b.x.shape == (256, 1, 28, 28) and 0.0 <= b.x.min().item() and b.x.max().item() <= 1.0
    assert b.x.max().item() == 1.0  # MNIST strokes reach 255


# --- validation ------------------------------------------------------------------------------------------


def _bad(**changes):
    x_tr, y_tr, x_te, y_te = _arrays()
    arrays = {"x_train": x_tr, "y_train": y_tr, "x_test": x_te, "y_test": y_te}
    num_classes = changes.pop("num_classes", None)
    arrays.update(changes)
    return check_arrays("toy", **arrays, num_classes=num_classes)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"x_train": np.zeros((12, 16), np.uint8)}, r"x_train has shape \(12, 16\) \(2-D\): expected 3-D"),
        ({"x_test": np.zeros((6, 1, 1, 4, 4), np.uint8)}, r"x_test has shape .* \(5-D\)"),
        ({"x_train": np.zeros((12, 5, 4, 5), np.uint8)}, r"x_train .* needs 1, 3 or 4 channels"),
        ({"y_train": np.arange(11)}, r"x_train has 12 images but y_train has 11 labels"),
        ({"y_test": np.zeros(6, dtype=np.float32)}, r"y_test has dtype float32: labels must be integers"),
        ({"y_test": np.zeros((6, 3), dtype=np.int64)}, r"y_test has shape \(6, 3\): expected one integer class label"),
        ({"y_train": np.full(12, -1)}, r"y_train has negative label -1"),
        ({"y_test": np.full(6, 5), "num_classes": 3}, r"y_test has label 5 but num_classes is 3.*\[0, 3\)"),
        ({"x_train": np.full((12, 1, 4, 4), np.nan, np.float32)}, r"x_train holds 192 NaN/inf values"),
        ({"x_test": np.full((6, 1, 4, 4), np.inf, np.float32)}, r"x_test holds 96 NaN/inf"),
        (
            {"x_train": np.full((12, 1, 4, 4), 255.0, np.float32)},
            r"x_train has float values in \[255, 255\]: expected floats in \[0, 1\]",
        ),
        ({"x_test": np.zeros((0, 1, 4, 4), np.uint8), "y_test": np.zeros(0, np.int64)}, r"x_test is empty"),
        ({"x_test": np.zeros((6, 1, 5, 5), np.uint8)}, r"train images are \(1, 4, 4\).*test images are \(1, 5, 5\)"),
        ({"x_train": np.zeros((12, 1, 4, 4), np.int32)}, r"x_train has unsupported dtype int32: expected uint8"),
        ({"x_test": np.zeros((6, 1, 4, 4), np.float32)}, r"train images are uint8 but test images are float32"),
        ({"num_classes": 0}, r"num_classes=0 is invalid"),
    ],
)
def test_check_arrays_errors(changes, message):
    with pytest.raises(DataError, match=message) as info:
        _bad(**changes)
    assert "'toy'" in str(info.value)


def test_check_arrays_normalises_layout():
    x_tr, y_tr, x_te, y_te = _arrays()
    data = check_arrays("toy", x_tr[:, 0], y_tr.astype(np.uint8), x_te[:, 0], y_te.reshape(-1, 1).astype(np.int16))
    assert data.x_train.shape == (12, 1, 4, 4) and data.y_train.dtype == np.int64 and data.y_test.shape == (6,)
    assert data.num_classes == 3
    assert check_arrays("toy", x_tr, y_tr, x_te, y_te, num_classes=10).num_classes == 10
    f64 = np.full((12, 1, 4, 4), 0.5)
    assert check_arrays("toy", f64, y_tr, f64[:6], y_te).x_train.dtype == np.float32
    fortran = np.asfortranarray(x_tr)
    assert check_arrays("toy", fortran, y_tr, x_te, y_te).x_train.flags.c_contiguous


# --- npz -------------------------------------------------------------------------------------------------


def test_npz_channels_last_is_converted(tmp_path):
    rng = np.random.default_rng(1)
    x_train = rng.integers(0, 256, (10, 8, 6, 3), dtype=np.uint8)  # N x H x W x C
    x_test = rng.integers(0, 256, (4, 8, 6, 3), dtype=np.uint8)
    path = tmp_path / "rgb.npz"
    np.savez(path, x_train=x_train, y_train=np.arange(10) % 4, x_test=x_test, y_test=np.array([0, 1, 2, 3]))
    data = load_dataset(DataConfig(source=f"npz:{path}"))
    assert data.name == "rgb" and data.input_shape == (3, 8, 6) and data.num_classes == 4
    assert np.array_equal(data.x_train, x_train.transpose(0, 3, 1, 2)) and data.x_train.flags.c_contiguous
    assert np.array_equal(data.x_test[2, 1], x_test[2, :, :, 1])


def test_npz_grey_and_float_images(tmp_path):
    grey = tmp_path / "grey.npz"
    np.savez(
        grey,
        x_train=np.zeros((5, 7, 7), np.uint8),
        y_train=np.arange(5, dtype=np.int32) % 2,
        x_test=np.ones((2, 7, 7), np.uint8),
        y_test=np.ones(2, np.int32),
    )
    assert load_dataset(DataConfig(source=f"npz:{grey}")).input_shape == (1, 7, 7)
    floats = tmp_path / "floats.npz"
    np.savez(
        floats,
        x_train=np.full((5, 7, 7, 1), 0.25),
        y_train=np.arange(5) % 2,
        x_test=np.full((2, 7, 7, 1), 1.0),
        y_test=np.ones(2, np.int64),
    )
    data = load_dataset(DataConfig(source=f"npz:{floats}"))
    assert data.x_train.dtype == np.float32 and data.input_shape == (1, 7, 7) and data.x_test.max() == 1.0


def test_npz_missing_file_and_keys(tmp_path):
    missing = tmp_path / "nope.npz"
    with pytest.raises(DataError, match=r"npz file .*nope\.npz' does not exist.*x_train, y_train, x_test, y_test"):
        load_dataset(DataConfig(source=f"npz:{missing}"))
    partial = tmp_path / "partial.npz"
    np.savez(partial, images=np.zeros((3, 4, 4), np.uint8), x_train=np.zeros((3, 4, 4), np.uint8))
    with pytest.raises(DataError, match=r"lacks y_train, x_test, y_test: it needs arrays .* found images, x_train"):
        load_dataset(DataConfig(source=f"npz:{partial}"))
    bad = tmp_path / "bad.npz"
    np.savez(
        bad,
        x_train=np.zeros((3, 4, 4), np.uint8),
        y_train=np.zeros(3),
        x_test=np.zeros((3, 4, 4), np.uint8),
        y_test=np.zeros(3, np.int64),
    )
    with pytest.raises(DataError, match=r"dataset 'bad': y_train has dtype float64"):
        load_dataset(DataConfig(source=f"npz:{bad}"))


# --- parquet ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, shape", [(np.uint8, (3, 32, 32)), (np.float32, (1, 5, 7))])
def test_parquet_round_trip(tmp_path, dtype, shape):
    x_tr, y_tr, x_te, y_te = _arrays(n_train=23, n_test=9, shape=shape, dtype=dtype)
    original = check_arrays("cifar-like", x_tr, y_tr, x_te, y_te, num_classes=10)
    out = tmp_path / "shards"
    write_parquet(original, str(out), shard_size=5)
    assert sorted(p.name for p in (out / "train").iterdir()) == [f"part-{i:05d}.parquet" for i in range(5)]
    assert len(list((out / "test").iterdir())) == 2
    back = load_dataset(DataConfig(source=f"parquet:{out}"))
    assert back.name == "cifar-like" and back.num_classes == 10 and back.input_shape == shape
    for field in ("x_train", "y_train", "x_test", "y_test"):
        a, b = getattr(original, field), getattr(back, field)
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b), field
    assert back.x_train.flags.c_contiguous and back.x_train.flags.writeable
    via_uri = load_dataset(DataConfig(source=f"parquet:file://{out}"))
    assert np.array_equal(via_uri.x_test, original.x_test)


def test_parquet_schema_and_rewrite(tmp_path):
    import pyarrow.parquet as pq

    original = check_arrays("toy", *_arrays(n_train=20, n_test=4))
    out = tmp_path / "toy"
    write_parquet(original, str(out), shard_size=4)
    schema = pq.read_schema(out / "train" / "part-00000.parquet")
    assert str(schema.field("image").type) == "binary" and str(schema.field("label").type) == "int64"
    assert b'"shape": [1, 4, 4]' in schema.metadata[b"hsic_ray"] and b'"num_classes": 3' in schema.metadata[b"hsic_ray"]
    # Rewriting with bigger shards replaces the old ones instead of mixing them in.
    write_parquet(original, str(out), shard_size=100)
    assert [p.name for p in (out / "train").iterdir()] == ["part-00000.parquet"]
    assert np.array_equal(load_dataset(DataConfig(source=f"parquet:{out}")).x_train, original.x_train)


def test_parquet_missing_dataset_and_missing_shard(tmp_path):
    missing = tmp_path / "absent"
    with pytest.raises(
        DataError,
        match=r"parquet dataset .*absent' does not exist.*python -m hsic_ray.data prepare --source .* --output",
    ):
        load_dataset(DataConfig(source=f"parquet:{missing}"))
    out = tmp_path / "toy"
    write_parquet(check_arrays("toy", *_arrays(n_train=20, n_test=4)), str(out), shard_size=4)
    (out / "train" / "part-00002.parquet").unlink()
    with pytest.raises(DataError, match=r"found 16 images in 4 shards but 20 were written in 5 shards"):
        load_dataset(DataConfig(source=f"parquet:{out}"))
    write_parquet(check_arrays("toy", *_arrays(n_train=20, n_test=4)), str(out), shard_size=4)
    for p in (out / "test").iterdir():
        p.unlink()
    with pytest.raises(DataError, match=r"holds no .parquet shards.*prepare"):
        load_dataset(DataConfig(source=f"parquet:{out}"))


# --- torchvision -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("download", [True, False])
def test_torchvision_offline_error_says_where_files_go(tmp_path, download):
    root = tmp_path / "tv"
    with pytest.raises(DataError) as mnist:
        load_dataset(DataConfig(source="mnist", root=str(root), download=download))
    text = str(mnist.value)
    assert f"{root}/MNIST/raw/" in text and "train-images-idx3-ubyte" in text and "t10k-labels-idx1-ubyte" in text
    assert "network access" in text and "mnist-sample" in text
    assert ("could not be downloaded" if download else "is not on disk") in text

    with pytest.raises(DataError) as cifar:
        load_dataset(DataConfig(source="cifar10", root=str(root), download=download))
    assert f"{root}/cifar-10-batches-py/" in str(cifar.value) and "network access" in str(cifar.value)

    with pytest.raises(DataError, match=r"FashionMNIST/raw/.*network access"):
        load_dataset(DataConfig(source="fashion-mnist", root=str(root), download=download))


def _write_idx(path, array: np.ndarray) -> None:
    magic = struct.pack(">HBB", 0, 0x08, array.ndim)  # 0x08: unsigned byte
    path.write_bytes(magic + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes())


def test_torchvision_mnist_loads_placed_files(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    x_train, x_test = rng.integers(0, 256, (12, 28, 28)), rng.integers(0, 256, (5, 28, 28))
    y_train, y_test = np.arange(12) % 10, np.array([9, 8, 7, 6, 5])
    for name, arr in (
        ("train-images", x_train),
        ("train-labels", y_train),
        ("t10k-images", x_test),
        ("t10k-labels", y_test),
    ):
        _write_idx(raw / f"{name}-idx{arr.ndim}-ubyte", arr)
    data = load_dataset(DataConfig(source="mnist", root=str(tmp_path), download=False))
    assert data.name == "mnist" and data.num_classes == 10 and data.input_shape == (1, 28, 28)
    assert np.array_equal(data.x_train[:, 0], x_train) and np.array_equal(data.y_test, y_test)


# --- prepare CLI -----------------------------------------------------------------------------------------


def test_prepare_cli_writes_parquet(tmp_path, capsys, sample):
    out = tmp_path / "digits"
    assert main(["prepare", "--source", "mnist-sample", "--output", str(out), "--shard-size", "3000"]) == 0
    assert "8000 train + 2000 test" in capsys.readouterr().out
    assert len(list((out / "train").iterdir())) == 3
    back = load_dataset(DataConfig(source=f"parquet:{out}"))
    assert back.name == "mnist-sample" and back.num_classes == 10
    assert np.array_equal(back.x_train, sample.x_train) and np.array_equal(back.y_test, sample.y_test)


def test_prepare_cli_reports_data_errors(tmp_path, capsys):
    code = main(["prepare", "--source", f"npz:{tmp_path / 'missing.npz'}", "--output", str(tmp_path / "out")])
    assert code == 2
    assert "error: npz file" in capsys.readouterr().err and not (tmp_path / "out").exists()
    with pytest.raises(SystemExit):
        main(["prepare", "--source", "mnist-sample"])  # --output is required


def test_load_dataset_is_public_and_takes_a_source_name():
    import hsic_ray

    by_name = hsic_ray.load_dataset("mnist-sample")
    by_config = hsic_ray.load_dataset(DataConfig(source="mnist-sample"))
    assert by_name.name == by_config.name
    assert np.array_equal(by_name.y_test, by_config.y_test) and len(by_name.y_test) > 0
    with pytest.raises(AttributeError, match="no attribute 'load_everything'"):
        hsic_ray.load_everything  # noqa: B018

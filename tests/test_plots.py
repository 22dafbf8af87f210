import os

import pytest
from matplotlib.image import imread

from hsic_ray.run.plots import plot_curves, plot_information_plane

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _records(n_epochs=4, n_layers=3):
    return [
        {
            "epoch": e,
            "per_layer": [
                {"nhsic_zx": 0.9 - 0.1 * l - 0.02 * e, "nhsic_zy": 0.3 + 0.1 * l + 0.05 * e} for l in range(n_layers)
            ],
        }
        for e in range(n_epochs)
    ]


def _assert_png(path):
    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    img = imread(str(path))
    assert img.ndim == 3 and img.shape[2] in (3, 4)
    h, w = img.shape[:2]
    assert 200 <= h <= 2000 and 200 <= w <= 3000


def _no_temp_files(directory, keep):
    assert sorted(os.listdir(directory)) == sorted(keep)


def test_information_plane_writes_png(tmp_path):
    path = tmp_path / "plane.png"
    plot_information_plane(_records(), path, title="test run")
    _assert_png(path)
    _no_temp_files(tmp_path, ["plane.png"])


def test_information_plane_single_layer_single_epoch_and_str_path(tmp_path):
    path = tmp_path / "one.png"
    plot_information_plane(_records(1, 1), str(path))
    _assert_png(path)


def test_information_plane_unsorted_epochs(tmp_path):
    path = tmp_path / "plane.png"
    plot_information_plane(list(reversed(_records(5, 2))), path)
    _assert_png(path)


def test_information_plane_replaces_existing_file(tmp_path):
    path = tmp_path / "plane.png"
    path.write_bytes(b"old contents")
    plot_information_plane(_records(), path)
    _assert_png(path)
    _no_temp_files(tmp_path, ["plane.png"])


def test_information_plane_inconsistent_layers_leaves_old_file(tmp_path):
    path = tmp_path / "plane.png"
    plot_information_plane(_records(), path)
    before = path.read_bytes()
    bad = _records(3, 3)
    bad[2]["per_layer"] = bad[2]["per_layer"][:2]
    with pytest.raises(ValueError, match="layers"):
        plot_information_plane(bad, path)
    assert path.read_bytes() == before
    _no_temp_files(tmp_path, ["plane.png"])


def test_information_plane_empty_records_raises(tmp_path):
    path = tmp_path / "plane.png"
    with pytest.raises(ValueError, match="empty"):
        plot_information_plane([], path)
    assert not path.exists()
    _no_temp_files(tmp_path, [])


@pytest.mark.parametrize(
    "records",
    [
        [{"epoch": 0}],
        [{"epoch": 0, "per_layer": []}],
        [{"epoch": 0, "per_layer": [{"nhsic_zx": 0.5}]}],
        [{"epoch": 0, "per_layer": [{"nhsic_zx": "abc", "nhsic_zy": 0.1}]}],
        [{"epoch": 0, "per_layer": [{"nhsic_zx": float("nan"), "nhsic_zy": 0.1}]}],
    ],
)
def test_information_plane_malformed_records_raise(tmp_path, records):
    path = tmp_path / "plane.png"
    path.write_bytes(b"keep me")
    with pytest.raises(ValueError):
        plot_information_plane(records, path)
    assert path.read_bytes() == b"keep me"
    _no_temp_files(tmp_path, ["plane.png"])


def test_failure_while_rendering_leaves_old_file(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    path = tmp_path / "plane.png"
    path.write_bytes(b"keep me")

    def boom(self, *args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(Figure, "savefig", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        plot_information_plane(_records(), path)
    assert path.read_bytes() == b"keep me"
    _no_temp_files(tmp_path, ["plane.png"])


def test_curves_writes_png(tmp_path):
    path = tmp_path / "curves.png"
    series = {
        "hungarian": [(1, 80.0), (2, 85.0), (3, 90.5)],
        "greedy": [(1, 70.0), (2, 82.0), (3, 88.0)],
        "single point": [(2.0, 50.0)],
    }
    plot_curves(series, path, xlabel="depth", ylabel="test accuracy (%)", title="acc vs depth")
    _assert_png(path)
    _no_temp_files(tmp_path, ["curves.png"])


def test_curves_take_ticks_and_a_floor_and_refuse_non_finite_ones(tmp_path):
    path = tmp_path / "throughput.png"
    series = {"pipeline": [(2, 2400.0), (4, 2200.0), (8, 1700.0)], "in process": [(2, 2100.0), (8, 2100.0)]}
    plot_curves(series, path, xlabel="stages", ylabel="samples/s", xticks=[2, 4, 8], ymin=0)
    _assert_png(path)
    for bad in ({"xticks": [2, float("nan")]}, {"ymin": float("-inf")}, {"xticks": ["two"]}):
        with pytest.raises(ValueError, match="xticks|ymin"):
            plot_curves(series, tmp_path / "bad.png", xlabel="x", ylabel="y", **bad)
        assert not (tmp_path / "bad.png").exists()
    _no_temp_files(tmp_path, ["throughput.png"])


@pytest.mark.parametrize(
    "series",
    [
        {},
        {"a": []},
        {"a": [(1, 2, 3)]},
        {"a": [(1, float("inf"))]},
    ],
)
def test_curves_bad_series_leave_old_file(tmp_path, series):
    path = tmp_path / "curves.png"
    path.write_bytes(b"keep me")
    with pytest.raises(ValueError):
        plot_curves(series, path, xlabel="x", ylabel="y")
    assert path.read_bytes() == b"keep me"
    _no_temp_files(tmp_path, ["curves.png"])


def test_plots_do_not_touch_pyplot(tmp_path):
    import sys

    had_pyplot = "matplotlib.pyplot" in sys.modules
    plot_curves({"a": [(0, 0), (1, 1)]}, tmp_path / "c.png", "x", "y")
    if not had_pyplot:
        assert "matplotlib.pyplot" not in sys.modules

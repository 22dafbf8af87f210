import os

import pytest
from matplotlib.image import imread

from hsic_ray.run.plots import plot_curves, plot_information_plane, plot_probes

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


def _figures_drawn(monkeypatch):
    """Every figure the plot functions save, drawn, in order (the real figure, before its PNG is written)."""
    from hsic_ray.run import plots

    figures = []
    save = plots._save_atomic

    def keep(fig, path):
        save(fig, path)
        fig.canvas.draw()
        figures.append(fig)

    monkeypatch.setattr(plots, "_save_atomic", keep)
    return figures


def _tick_labels(axis, view):
    """The labels of the ticks inside the axis' view (matplotlib also places some just outside it)."""
    low, high = sorted(view)
    return [t.get_text() for t in axis.get_ticklabels() if low <= t.get_position()[axis is axis.axes.yaxis] <= high]


def _is_whole(label):
    return label.replace("\u2212", "-").lstrip("-").isdigit()


@pytest.mark.parametrize(
    "xs",
    [[1, 2, 3], [2, 4], [1], list(range(1, 16))],
    ids=["3 epochs", "depths 2 and 4", "one epoch", "15 epochs"],
)
def test_curves_over_whole_numbers_get_whole_number_ticks(tmp_path, monkeypatch, xs):
    figures = _figures_drawn(monkeypatch)
    plot_curves({"layer 1": [(x, 0.5 + 0.1 * x) for x in xs]}, tmp_path / "c.png", "epoch", "log10 gradient norm")
    ax = figures[0].axes[0]
    labels = _tick_labels(ax.xaxis, ax.get_xlim())
    assert labels and all(_is_whole(label) for label in labels), labels
    if len(xs) <= 12:  # few points: a tick at each, none between
        assert labels == [str(x) for x in xs]


def test_curves_over_fractions_keep_fractional_ticks(tmp_path, monkeypatch):
    figures = _figures_drawn(monkeypatch)
    plot_curves({"lr": [(0.1, 80.0), (0.2, 85.0), (0.3, 82.0)]}, tmp_path / "c.png", "lr", "accuracy")
    ax = figures[0].axes[0]
    labels = _tick_labels(ax.xaxis, ax.get_xlim())
    assert any("." in label for label in labels), labels


def test_layer_and_epoch_axes_of_probes_and_information_plane_are_whole_numbers(tmp_path, monkeypatch):
    figures = _figures_drawn(monkeypatch)
    probes = [{"epoch": e, "test_accuracy": [50.0 + e, 60.0 + e, 70.0, 65.0, 64.0]} for e in range(4)]
    plot_probes(probes, tmp_path / "probes.png", final={"test_accuracy": [55.0, 66.0, 72.0, 70.0, 69.0]})
    plot_information_plane(_records(n_epochs=3, n_layers=5), tmp_path / "plane.png")
    probes_ax, epochs_bar = figures[0].axes
    layers = _tick_labels(probes_ax.xaxis, probes_ax.get_xlim())
    assert layers == ["1", "2", "3", "4", "5"]
    assert _tick_labels(epochs_bar.yaxis, epochs_bar.get_ylim()) == ["0", "1", "2", "3"]
    layer_bar = figures[1].axes[1]
    assert _tick_labels(layer_bar.yaxis, layer_bar.get_ylim()) == ["1", "2", "3", "4", "5"]


def _legend_and_axes_boxes(fig):
    ax = fig.axes[0]
    renderer = fig.canvas.get_renderer()
    return ax.get_legend().get_window_extent(renderer), ax.get_window_extent(renderer)


def test_a_long_legend_goes_below_the_curves_and_stays_in_the_figure(tmp_path, monkeypatch):
    figures = _figures_drawn(monkeypatch)
    names = [f"hsic seed {seed} model.last_width=512 model.init=identity" for seed in range(6)]
    plot_curves({name: [(8, 80.0 + k), (56, 82.0 + k)] for k, name in enumerate(names)}, tmp_path / "c.png", "x", "y")
    legend, axes = _legend_and_axes_boxes(figures[0])
    assert legend.y1 < axes.y0 and legend.y0 >= 0  # under the axes (and their labels), inside the figure
    assert [t.get_text() for t in figures[0].axes[0].get_legend().get_texts()] == names


def test_a_short_legend_stays_inside_the_axes(tmp_path, monkeypatch):
    figures = _figures_drawn(monkeypatch)
    plot_curves({"hsic": [(8, 87.0), (20, 86.0)], "backprop": [(8, 88.0), (20, 85.0)]}, tmp_path / "c.png", "x", "y")
    legend, axes = _legend_and_axes_boxes(figures[0])
    assert axes.x0 <= legend.x0 and legend.x1 <= axes.x1 and axes.y0 <= legend.y0 and legend.y1 <= axes.y1

"""Plots written to PNG files: the information plane of a run, its layers' linear probes, and generic curves.

Figures are built with `matplotlib.figure.Figure` and rendered by the Agg canvas directly, so this module
never touches pyplot or the global backend. Every plot is validated before anything is drawn, rendered to
a temporary file in the destination directory and moved into place with `os.replace`: a failure leaves
any earlier file at the path untouched, and a reader never sees a half-written PNG.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import BoundaryNorm
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

DPI = 100
FIGSIZE = (7.0, 5.0)
MAX_POINT_TICKS = 12  # up to this many whole-number x values, each gets its own tick
LEGEND_INSIDE_MAX, LEGEND_INSIDE_CHARS = 4, 28  # a curve plot's legend beyond these goes below the axes
LEGEND_ROW_INCHES = 0.22


def _save_atomic(fig: Figure, path: str | os.PathLike) -> None:
    """Render `fig` as PNG to a temporary file next to `path`, then move it into place."""
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise FileNotFoundError(f"directory for the plot does not exist: {directory}")
    FigureCanvasAgg(fig)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp.png", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png", dpi=DPI)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; a plot is an ordinary readable file
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _finite_float(value: Any, what: str) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{what} must be a number; got {value!r}")
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number; got {value!r}") from None
    if not math.isfinite(x):
        raise ValueError(f"{what} must be finite; got {x}")
    return x


def _information_plane_data(records: Sequence[Mapping]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(epochs [E], zx [E, L], zy [E, L]) from the records, sorted by epoch; ValueError on bad records."""
    if not isinstance(records, Sequence) or isinstance(records, (str, bytes)):
        raise ValueError("records must be a list of per-epoch dicts")
    if len(records) == 0:
        raise ValueError("records is empty: nothing to plot in the information plane")
    epochs, zx, zy = [], [], []
    n_layers = None
    for i, rec in enumerate(records):
        if not isinstance(rec, Mapping) or "epoch" not in rec or "per_layer" not in rec:
            raise ValueError(f"records[{i}] must be a dict with keys 'epoch' and 'per_layer'")
        epoch = _finite_float(rec["epoch"], f"records[{i}]['epoch']")
        layers = rec["per_layer"]
        if not isinstance(layers, Sequence) or isinstance(layers, (str, bytes)) or len(layers) == 0:
            raise ValueError(f"records[{i}]['per_layer'] must be a non-empty list of per-layer dicts")
        if n_layers is None:
            n_layers = len(layers)
        elif len(layers) != n_layers:
            raise ValueError(
                f"records[{i}] (epoch {rec['epoch']}) has {len(layers)} layers but records[0] has "
                f"{n_layers}: every epoch must measure the same layers"
            )
        row_x, row_y = [], []
        for j, layer in enumerate(layers):
            where = f"records[{i}]['per_layer'][{j}]"
            if not isinstance(layer, Mapping) or "nhsic_zx" not in layer or "nhsic_zy" not in layer:
                raise ValueError(f"{where} must be a dict with keys 'nhsic_zx' and 'nhsic_zy'")
            row_x.append(_finite_float(layer["nhsic_zx"], f"{where}['nhsic_zx']"))
            row_y.append(_finite_float(layer["nhsic_zy"], f"{where}['nhsic_zy']"))
        epochs.append(epoch)
        zx.append(row_x)
        zy.append(row_y)
    order = np.argsort(np.asarray(epochs), kind="stable")
    return np.asarray(epochs)[order], np.asarray(zx)[order], np.asarray(zy)[order]


def plot_information_plane(records: list[dict], path: str | os.PathLike, title: str = "") -> None:
    """Each layer's trajectory over epochs in the information plane, written as a PNG to `path`.

    `records` holds one dict per epoch: ``{"epoch": int, "per_layer": [{"nhsic_zx": float,
    "nhsic_zy": float}, ...]}`` with the same number of layers every epoch (records are sorted by epoch).
    x is nHSIC(Z_i, X), y is nHSIC(Z_i, Y); layer i (1-based) gets one viridis colour, a marker at each
    epoch and a star at the last one. Raises ValueError on empty or inconsistent records, before anything
    is written.
    """
    epochs, zx, zy = _information_plane_data(records)
    n_layers = zx.shape[1]

    cmap = colormaps["viridis"]
    norm = BoundaryNorm(np.arange(0.5, n_layers + 1.5), cmap.N)
    fig = Figure(figsize=FIGSIZE)
    ax = fig.add_subplot(1, 1, 1)
    for j in range(n_layers):
        colour = cmap(norm(j + 1))
        ax.plot(zx[:, j], zy[:, j], "-o", color=colour, markersize=4, linewidth=1.5, alpha=0.9)
        ax.plot(
            zx[-1, j],
            zy[-1, j],
            marker="*",
            markersize=14,
            color=colour,
            markeredgecolor="black",
            markeredgewidth=0.8,
            linestyle="none",
            zorder=3,
        )
    # Legend for the marker shapes only; colours are explained by the colorbar.
    ax.plot([], [], "o", color="grey", markersize=4, label="epoch")
    ax.plot([], [], "*", color="grey", markersize=12, markeredgecolor="black", label=f"last epoch ({epochs[-1]:g})")
    ax.legend(loc="best", fontsize="small")

    mappable = ScalarMappable(norm=norm, cmap=cmap)
    mappable.set_array(np.arange(1, n_layers + 1))
    step = max(1, int(math.ceil(n_layers / 12)))
    cbar = fig.colorbar(mappable, ax=ax, ticks=np.arange(1, n_layers + 1, step))
    cbar.set_label("layer")

    ax.set_xlabel("nHSIC(Z, X)")
    ax.set_ylabel("nHSIC(Z, Y)")
    _finish(fig, ax, path, title)


def _finish(fig, ax, path: str | os.PathLike, title: str) -> None:
    """Grid, title, layout, then the atomic write every plot ends with."""
    ax.grid(True, alpha=0.3)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    _save_atomic(fig, path)


def _accuracies(record: Any, key: str, where: str) -> list[float]:
    values = record.get(key) if isinstance(record, Mapping) else None
    if not isinstance(values, Sequence) or isinstance(values, (str, bytes)) or len(values) == 0:
        raise ValueError(f"{where} must be a dict with a non-empty list {key!r} of per-layer accuracies")
    return [_finite_float(v, f"{where}[{key!r}][{j}]") for j, v in enumerate(values)]


def plot_probes(records: list[dict], path: str | os.PathLike, title: str = "", final: Mapping | None = None) -> None:
    """Linear probe test accuracy against layer index, one line per epoch, written as a PNG to `path`.

    `records` holds one dict per epoch, ``{"epoch": int, "test_accuracy": [% per layer]}`` (the probes'
    records of metrics.jsonl); `final`, if given, the probes at the end of the run
    (``{"test_accuracy": [...], "train_accuracy": [...]}``), drawn in black over them. Epochs are coloured
    along viridis (a colorbar, not a legend, so 15 epochs of 52 layers stay readable). Raises ValueError on
    empty or inconsistent records, before anything is written.
    """
    lines = []
    for i, rec in enumerate(records):
        if not isinstance(rec, Mapping) or "epoch" not in rec:
            raise ValueError(f"records[{i}] must be a dict with keys 'epoch' and 'test_accuracy'")
        epoch = _finite_float(rec["epoch"], f"records[{i}]['epoch']")
        lines.append((epoch, _accuracies(rec, "test_accuracy", f"records[{i}]")))
    final_lines = {
        key: _accuracies(final, key, "final")
        for key in ("test_accuracy", "train_accuracy")
        if final is not None and key in final
    }
    if not lines and "test_accuracy" not in final_lines:
        raise ValueError("no probe records and no final test accuracies: nothing to plot")
    widths = {len(acc) for _, acc in lines} | {len(acc) for acc in final_lines.values()}
    if len(widths) != 1:
        raise ValueError(f"every record must probe the same layers; got layer counts {sorted(widths)}")
    n_layers = widths.pop()
    layers = np.arange(1, n_layers + 1)
    marker = "o" if n_layers <= 24 else None  # markers on 52 layers would hide the lines

    fig = Figure(figsize=FIGSIZE)
    ax = fig.add_subplot(1, 1, 1)
    lines.sort(key=lambda line: line[0])
    if lines:
        epochs = np.asarray([epoch for epoch, _ in lines])
        cmap = colormaps["viridis"]
        norm = BoundaryNorm(np.arange(epochs[0] - 0.5, epochs[-1] + 1.5), cmap.N)  # one colour per epoch
        for epoch, acc in lines:
            ax.plot(layers, acc, marker=marker, markersize=3, linewidth=1.2, color=cmap(norm(epoch)), alpha=0.85)
        mappable = ScalarMappable(norm=norm, cmap=cmap)
        mappable.set_array(epochs)
        ticks = epochs[:: max(1, int(math.ceil(len(epochs) / 12)))]
        fig.colorbar(mappable, ax=ax, ticks=ticks).set_label("epoch (probes on fixed subsets)")
    styles = {
        "test_accuracy": ("-", "final, test (whole split)"),
        "train_accuracy": (":", "final, train"),
    }
    for key, acc in final_lines.items():
        style, label = styles[key]
        ax.plot(layers, acc, style, color="black", linewidth=2.0, label=label)
    if final_lines:
        ax.legend(loc="best", fontsize="small")
    step = max(1, int(math.ceil(n_layers / 13)))
    ax.set_xticks(np.arange(1, n_layers + 1, step))
    ax.set_xlabel("layer")
    ax.set_ylabel("linear probe accuracy (%)")
    _finish(fig, ax, path, title)


def _curve_data(series: Any) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Each series' name, xs and ys; ValueError when there is none, one has no points, or a point is not finite."""
    if not isinstance(series, Mapping) or len(series) == 0:
        raise ValueError("series must be a non-empty dict of name -> list of (x, y) points")
    data: list[tuple[str, np.ndarray, np.ndarray]] = []
    for name, points in series.items():
        if isinstance(points, (str, bytes)):
            raise ValueError(f"series {name!r} must be a list of (x, y) points")
        try:
            points = list(points)
        except TypeError:
            raise ValueError(f"series {name!r} must be a list of (x, y) points") from None
        if len(points) == 0:
            raise ValueError(f"series {name!r} has no points")
        xs, ys = [], []
        for k, point in enumerate(points):
            try:
                x, y = point
            except (TypeError, ValueError):
                raise ValueError(f"series {name!r} point {k} must be an (x, y) pair; got {point!r}") from None
            xs.append(_finite_float(x, f"series {name!r} point {k} x"))
            ys.append(_finite_float(y, f"series {name!r} point {k} y"))
        data.append((str(name), np.asarray(xs), np.asarray(ys)))
    return data


def plot_curves(
    series: dict[str, list[tuple[float, float]]],
    path: str | os.PathLike,
    xlabel: str,
    ylabel: str,
    title: str = "",
    xticks: Sequence[float] | None = None,
    ymin: float | None = None,
) -> None:
    """A line plot, one line (with point markers) per named series of (x, y) points, with a legend,
    written as a PNG to `path`; `xticks`: where the x axis is labelled (default: where every x is a whole number,
    at the points' x values, or on whole numbers where there are many; else matplotlib's choice),
    `ymin`: where the y axis starts (0 for throughputs, so that differences are not magnified). Raises
    ValueError, before anything is written, when there is no series, a series has no points, or a point,
    tick or ymin is not finite."""
    data = _curve_data(series)
    ticks = None if xticks is None else [_finite_float(x, f"xticks[{k}]") for k, x in enumerate(xticks)]
    floor = None if ymin is None else _finite_float(ymin, "ymin")

    fig = Figure(figsize=FIGSIZE)
    ax = fig.add_subplot(1, 1, 1)
    for name, xs, ys in data:
        ax.plot(xs, ys, "-o", markersize=4, label=name)
    xs_all = sorted({x for _, xs, _ in data for x in xs.tolist()})
    if ticks is not None:
        ax.set_xticks(ticks)
    elif all(x.is_integer() for x in xs_all):  # epochs, depths, stages: no tick at 2.5
        if len(xs_all) <= MAX_POINT_TICKS:
            ax.set_xticks(xs_all)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if floor is not None:
        ax.set_ylim(bottom=floor)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    _curve_legend(ax, [name for name, _, _ in data])
    _finish(fig, ax, path, title)


def _curve_legend(ax, names: list[str]) -> None:
    """Inside the axes where it is small; below them where it would cover the curves (many or long names,
    as a combined sweep's), the figure grown to hold it."""
    if len(names) <= LEGEND_INSIDE_MAX and max(map(len, names)) <= LEGEND_INSIDE_CHARS:
        ax.legend(loc="best", fontsize="small")
        return
    columns = 2 if max(map(len, names)) <= LEGEND_INSIDE_CHARS else 1
    rows = -(-len(names) // columns)
    ax.figure.set_figheight(ax.figure.get_figheight() + LEGEND_ROW_INCHES * rows)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=columns, fontsize="small", frameon=False)

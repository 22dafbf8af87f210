"""hsic_ray.sweep_results: a finished sweep's table, its mean over seeds, and its plot, from plain rows (no Ray)."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest
from matplotlib.image import imread

from hsic_ray import sweep_results
from hsic_ray.config import build_config, save_config
from hsic_ray.run.directory import RunDirectory
from hsic_ray.run.plots import plot_curves as real_plot_curves
from hsic_ray.sweep_results import (
    failed_trials,
    read_results,
    results_markdown,
    seed_means,
    series_label,
    write_results,
)

JOB = Path(__file__).resolve().parents[1] / "jobs" / "sweep_depth.py"


def row(method, depth, seed, accuracy, unformatted=None, finished=True, error=None, skips=False):
    return {
        "depth": depth,
        "method": method,
        "model.skips": skips,
        "train.seed": seed,
        "test_accuracy": accuracy,
        "test_accuracy_unformatted": unformatted,
        "finished": finished,
        "error": error,
    }


ROWS = [
    row("hsic", 8, 1, 77.0, 60.0),
    row("hsic", 8, 2, 79.0, 62.0),
    row("hsic", 56, 1, 68.0, 50.0),
    row("hsic", 56, 2, 69.5, 51.0),
    row("backprop", 8, 1, 75.0),
    row("backprop", 8, 2, 74.0),
    row("backprop", 56, 1, 70.0, skips=True),
    row("backprop", 56, 2, None, finished=False),  # stopped early: no final accuracy, not in the means
]


def test_seeds_are_replicates_averaged_per_setting_and_depth():
    assert series_label(ROWS[0]) == "hsic skips=False"  # the seed is not part of the setting
    means = {(m["setting"], m["depth"]): m for m in seed_means(ROWS)}
    assert sorted(means) == [
        ("backprop skips=False", 8),
        ("backprop skips=True", 56),
        ("hsic skips=False", 8),
        ("hsic skips=False", 56),
    ]
    hsic56 = means[("hsic skips=False", 56)]
    assert (hsic56["seeds"], hsic56["lowest"], hsic56["highest"]) == (2, 68.0, 69.5)
    assert hsic56["test_accuracy_mean"] == pytest.approx(68.75) and hsic56["unformatted_mean"] == pytest.approx(50.5)
    backprop56 = means[("backprop skips=True", 56)]
    assert backprop56["seeds"] == 1 and backprop56["unformatted_mean"] is None


def test_results_md_adds_the_means_only_when_the_grid_runs_over_seeds(tmp_path):
    text = results_markdown(ROWS)
    trials, means = text.split("\nMean over seeds (formatted test accuracy, %):\n\n")
    assert trials.startswith("| depth | method | model.skips | train.seed |")
    assert len(trials.strip().splitlines()) == 2 + len(ROWS)
    assert "| hsic skips=False | 56 | 2 | 68.75 | 68.00 | 69.50 | 50.50 |" in means
    unseeded = [{k: v for k, v in r.items() if k != "train.seed"} for r in ROWS[:1]]
    assert "Mean over seeds" not in results_markdown(unseeded)


def test_write_results_writes_csv_md_and_a_plot_of_the_means(tmp_path, monkeypatch):
    plotted = []

    def plot_curves(series, path, *args, **kwargs):
        plotted.append(series)
        real_plot_curves(series, path, *args, **kwargs)

    monkeypatch.setattr(sweep_results, "plot_curves", plot_curves)
    run = RunDirectory(str(tmp_path / "sweep"))
    write_results(run, ROWS)
    assert plotted == [
        {
            "backprop skips=False": [(8, 74.5)],
            "backprop skips=True": [(56, 70.0)],
            "hsic skips=False": [(8, 78.0), (56, 68.75)],
        }
    ]
    with open(tmp_path / "sweep" / "results.csv") as f:
        assert [r["train.seed"] for r in csv.DictReader(f)] == [str(r["train.seed"]) for r in ROWS]
    assert (tmp_path / "sweep" / "results.md").read_text() == results_markdown(ROWS)
    image = imread(tmp_path / "sweep" / "accuracy_vs_depth.png")
    assert image.ndim == 3 and image.shape[0] > 100


def test_failed_trials_are_named_and_stopped_ones_are_not_failures():
    rows = [
        {"depth": 2, "method": "hsic", "model.activation": "elu", "finished": True, "error": None},
        {"depth": 4, "method": "hsic", "model.activation": "elu", "finished": False, "error": "RayTaskError"},
        {"depth": 4, "method": "backprop", "model.activation": "elu", "finished": False, "error": None},
    ]
    assert failed_trials(rows[::2]) is None  # the second one: stopped early by ASHA
    assert failed_trials(rows) == "1 of 3 trials failed: hsic activation=elu depth 4 (RayTaskError)"
    seeded = [{**rows[1], "train.seed": 3}]
    assert failed_trials(seeded) == "1 of 1 trials failed: hsic activation=elu seed=3 depth 4 (RayTaskError)"


def sweep_dir(path, rows):
    run = RunDirectory(str(path))
    write_results(run, rows)
    return str(path)


def combine_job(*args):
    return subprocess.run([sys.executable, str(JOB), "--combine", *args], capture_output=True, text=True, timeout=120)


def test_combine_writes_two_sweeps_as_one_table_and_refuses_what_it_cannot_read(tmp_path):
    hsic_rows = [{k: v for k, v in r.items() if k != "model.skips"} for r in ROWS if r["method"] == "hsic"]
    backprop_rows = [r for r in ROWS if r["method"] == "backprop"]
    hsic = sweep_dir(tmp_path / "hsic", hsic_rows)
    backprop = sweep_dir(tmp_path / "backprop", backprop_rows)
    out = tmp_path / "both"
    proc = combine_job(hsic, backprop, "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    rows = read_results(RunDirectory(str(out)))
    assert len(rows) == len(ROWS) and list(rows[0])[:4] == ["depth", "method", "train.seed", "model.skips"]
    # The HSIC sweep had no skips axis: its rows say nothing of it, and its series is named without it.
    assert {series_label(r) for r in rows} == {"hsic", "backprop skips=False", "backprop skips=True"}
    assert [r for r in rows if r["method"] == "hsic"] == [
        {**r, "model.skips": None} for r in read_results(RunDirectory(hsic))
    ]
    assert (out / "results.md").read_text() in proc.stdout
    assert (out / "accuracy_vs_depth.png").exists()

    before = (out / "results.md").read_text()
    again = combine_job(hsic, backprop, "--output", str(out))
    assert again.returncode == 2 and "already holds a finished run" in again.stderr
    assert (out / "results.md").read_text() == before
    missing = combine_job(hsic, str(tmp_path / "none"), "--output", str(tmp_path / "other"))
    assert missing.returncode == 2 and f"{tmp_path / 'none'} holds no results.csv" in missing.stderr.splitlines()[-1]
    assert not (tmp_path / "other").exists()


def with_trial(path, method, **settings):
    """A trial's run directory in the sweep at `path`, holding the config.yaml it ran with."""
    trial = path / "trials" / f"{method}-0001"
    trial.mkdir(parents=True)
    (trial / "config.yaml").write_text(save_config(build_config(overrides=settings)))


def test_combine_fills_an_axis_a_sweep_did_not_have_from_what_its_trials_ran_with(tmp_path):
    # As in a depth study: one sweep without a skips or beta axis, then one that has both.
    first = [{k: v for k, v in row(m, 8, 1, 80.0).items() if k != "model.skips"} for m in ("hsic", "backprop")]
    second = [
        {**row("hsic", 8, 1, 81.0), "hsic.beta": 100.0},
        {**row("backprop", 8, 1, 82.0, skips=True), "hsic.beta": 100.0},
    ]
    sweep_dir(tmp_path / "first", first)
    sweep_dir(tmp_path / "second", second)
    for method in ("hsic", "backprop"):
        with_trial(tmp_path / "first", method, **{"model.skips": False, "hsic.beta": 1000.0})
    # A third whose trial's config.yaml cannot be read: its row stays blank where it had no axis.
    sweep_dir(tmp_path / "third", [{k: v for k, v in row("hsic", 8, 2, 83.0).items() if k != "model.skips"}])
    (tmp_path / "third" / "trials" / "hsic-0001").mkdir(parents=True)
    (tmp_path / "third" / "trials" / "hsic-0001" / "config.yaml").write_text("model: [unclosed\n")
    out = tmp_path / "all"
    sweeps = [str(tmp_path / name) for name in ("first", "second", "third")]
    proc = combine_job(*sweeps, "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    rows = {(r["method"], r["test_accuracy"]): r for r in read_results(RunDirectory(str(out)))}
    assert rows["hsic", 83.0]["model.skips"] is None and rows["hsic", 83.0]["hsic.beta"] is None
    del rows["hsic", 83.0]
    assert rows["hsic", 80.0]["model.skips"] is False and rows["hsic", 80.0]["hsic.beta"] == 1000.0
    # Backprop reads no hsic settings: the first sweep's backprop row takes its skips, not its beta.
    assert rows["backprop", 80.0]["model.skips"] is False and rows["backprop", 80.0]["hsic.beta"] is None
    assert rows["backprop", 82.0]["model.skips"] is True and rows["hsic", 81.0]["hsic.beta"] == 100.0
    assert {series_label(r) for r in rows.values()} == {
        "hsic skips=False beta=1000.0",
        "hsic skips=False beta=100.0",
        "backprop skips=False",
        "backprop skips=True beta=100.0",
    }

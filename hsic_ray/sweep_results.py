"""A finished sweep's results, from one row per trial: results.csv, results.md, accuracy_vs_depth.png.

Seeds are replicates, not settings: where the grid runs over `train.seed`, results.md adds the mean of each
setting's seeds at each depth, and the plot draws that mean, one line per setting, so that a depth study with
several seeds reads as one curve per method rather than one per seed. `combine_sweeps` writes several finished
sweeps (say, HSIC in one and backprop in another) as one table and plot; a setting that one of them ran as a grid
axis and another did not is filled in, in the other's rows, from what its trials ran with, so that the same
setting draws one curve. Plain values in, files out: no Ray.
"""

from __future__ import annotations

import csv
import io
import statistics
from typing import Any

import yaml

from hsic_ray.errors import ConfigError, OutputExistsError
from hsic_ray.run import claim as run_claim
from hsic_ray.run.directory import RunDirectory
from hsic_ray.run.plots import plot_curves
from hsic_ray.sweep_spec import axis_name

SEED_KEY = "train.seed"
# Config sections a method does not read: a setting there says nothing of that method's trials.
UNREAD_SECTIONS = {"hsic": ("backprop",), "backprop": ("hsic", "optim", "head")}


def series_label(row: dict[str, Any]) -> str:
    """The method, plus the grid settings of the row's trial but its seed (`hsic activation=elu`); a setting
    the trial did not have (None: its sweep had no such axis) is left out."""
    settings = [
        f"{axis_name(key)}={row[key]}" for key in row if "." in key and key != SEED_KEY and row[key] is not None
    ]
    return " ".join([row["method"], *settings])


def failed_trials(rows: list[dict[str, Any]]) -> str | None:
    """A line naming the trials that failed, or None when none did (trials that ASHA stopped early did not
    fail)."""
    failed = [r for r in rows if r["error"]]
    if not failed:
        return None
    names = ", ".join(f"{_trial_label(r)} depth {r['depth']} ({r['error']})" for r in failed)
    return f"{len(failed)} of {len(rows)} trials failed: {names}"


def row_order(row: dict[str, Any]) -> tuple[str, int, int]:
    """Where a row goes in a results table: by setting, then depth, then seed."""
    return series_label(row), row["depth"], row.get(SEED_KEY) or 0


def _seeded(rows: list[dict[str, Any]]) -> bool:
    return bool(rows) and SEED_KEY in rows[0]


def _trial_label(row: dict[str, Any]) -> str:
    return series_label(row) + (f" seed={row[SEED_KEY]}" if SEED_KEY in row else "")


def seed_means(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per setting and depth, over the finished trials' seeds: how many, and the mean, lowest and highest
    formatted accuracy (and the mean unformatted one, where the method has it)."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in rows:
        if r["finished"] and r["test_accuracy"] is not None:
            groups.setdefault((series_label(r), r["depth"]), []).append(r)
    means = []
    for (label, depth), group in sorted(groups.items()):
        formatted = [r["test_accuracy"] for r in group]
        unformatted = [r["test_accuracy_unformatted"] for r in group if r.get("test_accuracy_unformatted") is not None]
        means.append(
            {
                "setting": label,
                "depth": depth,
                "seeds": len(group),
                "test_accuracy_mean": statistics.fmean(formatted),
                "lowest": min(formatted),
                "highest": max(formatted),
                "unformatted_mean": statistics.fmean(unformatted) if unformatted else None,
            }
        )
    return means


def markdown_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(no trials)\n"
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = [
            f"{v:.2f}" if isinstance(v, float) else ("-" if v is None else str(v)) for v in (r[c] for c in columns)
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def results_markdown(rows: list[dict[str, Any]]) -> str:
    """results.md: the trials' table, then, where the grid runs over seeds, their means."""
    text = markdown_table(rows)
    if _seeded(rows):
        text += "\nMean over seeds (formatted test accuracy, %):\n\n" + markdown_table(seed_means(rows))
    return text


def _parsed(cell: str) -> Any:
    """A results.csv cell as the value it was written from: None, a bool, an int, a float or a string."""
    if cell == "":
        return None
    if cell in ("True", "False"):
        return cell == "True"
    for kind in (int, float):
        try:
            return kind(cell)
        except ValueError:
            pass
    return cell


def read_results(run: RunDirectory) -> list[dict[str, Any]]:
    """The rows of a finished sweep's results.csv, typed as `write_results` had them."""
    return [{k: _parsed(v) for k, v in r.items()} for r in csv.DictReader(io.StringIO(run.read_text("results.csv")))]


def trial_settings(run: RunDirectory) -> dict[str, dict[str, Any]]:
    """Per method, the settings its trials in the sweep `run` ran with, as "section.field" -> value, from one
    of its trials' config.yaml (the grid axes and the depth are the row's own); {} where the sweep keeps none.

    The file is read as the trial wrote it, not checked against today's config: a sweep of an older version
    still says what it ran with."""
    settings: dict[str, dict[str, Any]] = {}
    for name in run.list_dir(run_claim.SWEEP_TRIALS):
        method, config = name.split("-")[0], f"{run_claim.SWEEP_TRIALS}/{name}/{run_claim.CONFIG}"
        if method not in settings and run.exists(config):
            settings[method] = _flat_settings(run.read_text(config))
    return settings


def _flat_settings(config_text: str) -> dict[str, Any]:
    """A config.yaml's settings as "section.field" -> value; {} for a file that is not one."""
    try:
        sections = yaml.safe_load(config_text)
    except yaml.YAMLError:
        return {}
    if not isinstance(sections, dict):
        return {}
    return {
        f"{section}.{key}": value
        for section, fields in sections.items()
        if isinstance(fields, dict)
        for key, value in fields.items()
    }


def _ran_with(settings: dict[str, dict[str, Any]], method: str, key: str) -> Any:
    """The value of setting `key` in a method's trials, or None where the method does not read it or the sweep
    kept no trial of it."""
    if key.split(".")[0] in UNREAD_SECTIONS.get(method, ()):
        return None
    return settings.get(method, {}).get(key)


def combine(
    sweeps: list[list[dict[str, Any]]], settings: list[dict[str, dict[str, Any]]] | None = None
) -> list[dict[str, Any]]:
    """The rows of several sweeps as one table: every row gets every sweep's columns, grid axes before the
    result columns, as in each sweep's own table. An axis a row's sweep did not have takes the value its
    trials ran with (`settings`, each sweep's `trial_settings`), and None where that is not known or the
    row's method does not read it."""
    columns: list[str] = []
    for rows in sweeps:
        for key in rows[0] if rows else []:
            if key not in columns:
                columns.append(key)
    axes = [c for c in columns if "." in c]
    order = ["depth", "method", *axes, *(c for c in columns if c not in axes and c not in ("depth", "method"))]
    combined = []
    for rows, ran_with in zip(sweeps, settings or [{} for _ in sweeps]):
        for r in rows:
            filled = {c: _ran_with(ran_with, r["method"], c) for c in axes if c not in r}
            combined.append({c: filled[c] if c in filled else r.get(c) for c in order})
    return sorted(combined, key=row_order)


def write_results(run: RunDirectory, rows: list[dict[str, Any]]) -> None:
    columns = list(rows[0]) if rows else []
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    run.write_text("results.csv", text.getvalue())
    run.write_text("results.md", results_markdown(rows))
    means = seed_means(rows)
    if not means:
        return
    series: dict[str, list[tuple[float, float]]] = {}
    for m in means:
        series.setdefault(m["setting"], []).append((m["depth"], m["test_accuracy_mean"]))
    run.write_with_local_file(
        "accuracy_vs_depth.png",
        lambda path: plot_curves(
            series,
            path,
            "depth (hidden blocks)",
            "test accuracy (%), mean over seeds" if _seeded(rows) else "test accuracy (%)",
            "test accuracy against depth",
            xticks=sorted({m["depth"] for m in means}),
        ),
    )


def combine_sweeps(sources: list[str], output: str) -> list[dict[str, Any]]:
    """Finished sweeps' results (each a sweep's --output) as one table and plot in `output`, a new directory
    marked as a sweep's; runs nothing. Returns the combined rows."""
    runs = [RunDirectory(source) for source in sources]
    unfinished = [run.uri for run in runs if not run.exists("results.csv")]
    if unfinished:
        raise ConfigError(
            f"--combine: {', '.join(unfinished)} holds no results.csv; name the --output directories of finished sweeps"
        )
    rows = combine([read_results(run) for run in runs], [trial_settings(run) for run in runs])
    with run_claim.take(output, "sweep") as claim:
        if claim.interrupted:
            raise OutputExistsError(f"{claim.run.uri} holds an unfinished sweep; choose another --output")
        claim.commit()
        write_results(claim.run, rows)
    return rows

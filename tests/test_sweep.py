"""jobs/sweep_depth.py end to end: a smoke sweep on a real local Ray, resume, grids over any setting, and
sweeps that must fail fast (too big for the cluster, bad settings)."""

import argparse
import csv
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from ray import tune
from test_job_output import error_lines, output_lines, raw_number_lines

import hsic_ray
from hsic_ray.cli import grid_axis
from hsic_ray.config import build_config
from hsic_ray.data import load_dataset, to_tensor
from hsic_ray.distributed.shutdown import shutdown
from hsic_ray.evaluation import accuracy
from hsic_ray.sweep import METRIC, PROGRESS_EVERY_S, run_trial
from hsic_ray.sweep_progress import best_finished, progress_table, trial_status

JOB = Path(__file__).resolve().parents[1] / "jobs" / "sweep_depth.py"
sys.path.insert(0, str(JOB.parent))
import sweep_depth  # noqa: E402


def run_sweep(*args, timeout=600, cwd=None):
    return subprocess.run([sys.executable, str(JOB), *args], capture_output=True, text=True, timeout=timeout, cwd=cwd)


@pytest.mark.slow
def test_smoke_sweep_writes_table_and_plot_and_resumes(tmp_path):
    out = tmp_path / "sweep"
    uri = f"file://{out}"  # a URI passes through to Tune and every trial unchanged (s3://... works alike)
    started = time.perf_counter()
    proc = run_sweep("--smoke-test", "--output", uri)  # Ray's name for it; --smoke stays an alias
    seconds = time.perf_counter() - started
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_prints_plainly(proc, seconds, out)
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted((r["method"], r["depth"]) for r in rows) == [
        ("backprop", "2"),
        ("backprop", "4"),
        ("hsic", "2"),
        ("hsic", "4"),
    ]
    assert all(r["finished"] == "True" and 10 < float(r["test_accuracy"]) <= 100 for r in rows)
    assert all(float(r["test_accuracy_unformatted"]) > 10 for r in rows if r["method"] == "hsic")
    table = (out / "results.md").read_text()
    assert table.startswith("| depth | method |") and table in proc.stdout
    assert (out / "accuracy_vs_depth.png").read_bytes()[:4] == b"\x89PNG"
    trials = sorted(p.name for p in (out / "trials").iterdir())
    assert len(trials) == 4 and all(
        (out / "trials" / t / "metrics.json").exists() or t.startswith("backprop") for t in trials
    )

    assert not (Path.cwd() / "file:").exists()
    resumed = run_sweep("--smoke", "--output", uri, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert sorted(p.name for p in (out / "trials").iterdir()) == trials  # finished trials are not rerun
    assert error_lines(resumed) == [], resumed.stderr[-3000:]
    assert (out / "results.md").read_text() == table

    # A new sweep into the finished one is refused, and leaves every file as it was.
    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    again = run_sweep("--smoke", "--depths", "3", "--output", str(out))
    assert again.returncode == 2 and "already holds a finished run (sweep: results.csv)" in again.stderr
    assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before


@pytest.mark.slow
# Both signals take the same way out (SIGUSR1 to Tune), so one of them is resumed: the other's stop is checked.
@pytest.mark.parametrize("signum, code, resume", [(signal.SIGINT, 130, False), (signal.SIGTERM, 143, True)])
def test_ctrl_c_or_sigterm_stops_a_sweep_with_one_line_and_resume_finishes_it(tmp_path, signum, code, resume):
    out = tmp_path / "sweep"
    # One HSIC trial, long enough to be stopped in the middle (the smoke test's flags beside it win).
    args = ["--smoke-test", "--depths", "2", "--methods", "hsic", "--epochs", "5", "--max-steps", "120"]
    proc = subprocess.Popen(
        [sys.executable, str(JOB), *args, "--output", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 240
    while not any('"kind": "step"' in p.read_text() for p in out.glob("trials/*/metrics.jsonl")):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the trial did not start training in time"
        time.sleep(0.2)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=120)
    # Tune stops the trials and saves the sweep's state, as on its own Ctrl-C; the job says so in one line.
    assert proc.returncode == code, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == "interrupted; add --resume to the same command to continue"
    assert "Traceback" not in stderr and "Tuner.restore" not in stderr and not (out / "results.csv").exists()
    assert tune.Tuner.can_restore(str(out / "tune")), "the sweep's state was not saved for --resume"
    if not resume:
        return
    resumed = run_sweep(*args, "--output", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    with open(out / "results.csv") as f:
        assert [(r["method"], r["depth"], r["finished"]) for r in csv.DictReader(f)] == [("hsic", "2", "True")]


def _assert_prints_plainly(proc, seconds: float, out: Path) -> None:
    """A smoke sweep's output: no error line, no traceback, no unformatted number; its own progress tables, at
    most one per PROGRESS_EVERY_S (plus the first and the last), none of Tune's; Tune's TensorBoard events
    named where they are; the last table's best trial is the best of the results table."""
    assert error_lines(proc) == [] and raw_number_lines(proc) == [], proc.stderr[-3000:]
    lines = output_lines(proc)
    assert not [line for line in lines if re.search(r"[│╭╰├]|^\+-|^Trial status|== Status ==", line)]
    heads = [line for line in lines if " trials: " in line]
    rows = [line for line in lines if line.startswith("  ")]  # a table's column header and trial rows
    assert 1 <= len(heads) <= 2 + seconds / PROGRESS_EVERY_S, heads
    assert len(heads) < len(rows) <= 5 * len(heads)  # a smoke sweep has 4 trials
    assert len(lines) - len(heads) - len(rows) <= 30, lines  # the rest: the jobs' own lines and the results
    assert f"TensorBoard: tensorboard --logdir {out}/tune" in proc.stderr
    assert list(out.glob("tune/*/events.out.tfevents.*"))
    with open(out / "results.csv") as f:
        best = max(csv.DictReader(f), key=lambda r: float(r["test_accuracy"]))
    last = heads[-1].split(" ", 1)[1]  # after the time
    assert last.startswith(f"trials: 4 done; best finished: {best['method']} depth {best['depth']}: "), last
    assert heads[-1].endswith(f": {float(best['test_accuracy']):.2f}%")


def test_progress_table_ranks_finished_trials_by_their_final_accuracy_only():
    rows = [
        {"method": "hsic", "depth": 2, "activation": "elu", "status": "running", "epoch": 3, "readout": 92.3},
        {"method": "hsic", "depth": 4, "activation": "elu", "status": "done", "epoch": 5, "readout": 90.0},
        {"method": "backprop", "depth": 4, "activation": "relu", "status": "stopped", "epoch": 1, "readout": 95.0},
    ]
    finals = [None, 78.55, None]
    rows = [{**row, "final": final} for row, final in zip(rows, finals)]
    # The running trial's per-epoch readout (92.30) is higher, but only a final accuracy ranks.
    assert best_finished(rows, ["model.activation"]) == "hsic depth 4 activation=elu: 78.55%"
    assert best_finished(rows[:1], []) == "-"
    assert progress_table(rows) == [
        "method    depth  activation  status   epoch  readout  final",
        "hsic      2      elu         running  3      92.30    -",
        "hsic      4      elu         done     5      90.00    78.55",
        "backprop  4      relu        stopped  1      95.00    -",
    ]


def test_trial_status_tells_an_early_stop_from_a_finished_trial():
    assert trial_status("TERMINATED", {"final": True}) == "done"
    assert trial_status("TERMINATED", {"final": False}) == "stopped"  # ASHA stopped it before its final report
    assert trial_status("ERROR", {}) == "failed" and trial_status("PENDING", {}) == "pending"


def test_sweep_too_big_for_the_cluster_fails_fast(tmp_path):
    proc = run_sweep("--smoke", "--stages-per-trial", "3", "--gpus-per-stage", "1", "--output", str(tmp_path / "s"))
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: one HSIC trial needs") and "3 GPU" in last
    assert not (tmp_path / "s").exists()


def test_resume_without_a_sweep_is_refused(tmp_path):
    proc = run_sweep("--smoke", "--resume", "--output", str(tmp_path / "none"))
    assert proc.returncode == 2 and "holds no run to continue" in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "none").exists()


@pytest.mark.slow
def test_grid_over_any_setting_runs_one_trial_per_value(tmp_path, digits):
    """Paths relative to where the sweep starts (data and output) work, although Tune runs each trial elsewhere."""
    np.savez(
        tmp_path / "digits.npz",
        x_train=digits.x_train,
        y_train=digits.y_train,
        x_test=digits.x_test,
        y_test=digits.y_test,
    )
    out = tmp_path / "grid"
    proc = run_sweep(
        "--dataset",
        "npz:digits.npz",
        "--depths",
        "2",
        "--methods",
        "hsic",
        "--width",
        "64",
        "--epochs",
        "1",
        "--grid",
        "model.activation=relu,tanh",
        "--grid",
        "head.epochs=1",
        "--output",
        "grid",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["model.activation"] for r in rows) == ["relu", "tanh"]
    assert all(r["finished"] == "True" and r["head.epochs"] == "1" for r in rows)
    configs = [(t / "config.yaml").read_text() for t in (out / "trials").iterdir()]
    assert sorted(line.split()[-1] for c in configs for line in c.splitlines() if "activation:" in line) == [
        "relu",
        "tanh",
    ]
    assert (out / "accuracy_vs_depth.png").read_bytes()[:4] == b"\x89PNG"


def test_bad_grid_value_fails_before_ray_starts(tmp_path):
    # As a user sees it; more bad grids are tested in process (tests/test_bad_input.py).
    proc = run_sweep("--smoke", "--grid", "model.widht=32", "--output", str(tmp_path / "s"))
    assert proc.returncode == 2
    assert "Did you mean: 'width'" in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "s").exists()


def test_grid_flag_needs_a_dotted_key_and_values(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        sweep_depth.main(["--grid", "activation=relu", "--output", str(tmp_path / "s")])
    assert exited.value.code == 2 and "is not KEY=V1,V2,..." in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_grid_axis_parses_typed_values():
    assert grid_axis("train.batch_size=256,512") == ("train.batch_size", [256, 512])
    assert grid_axis("hsic.sigma=null, 6") == ("hsic.sigma", [None, 6])
    assert grid_axis("optim.lr=1e-4,3e-4") == ("optim.lr", [1e-4, 3e-4])
    assert grid_axis("model.activation=elu") == ("model.activation", ["elu"])
    for bad in ("activation=relu", "model.activation", "model.activation="):
        with pytest.raises(argparse.ArgumentTypeError, match="KEY=V1,V2"):
            grid_axis(bad)


@pytest.mark.slow
def test_asha_ranks_both_methods_by_one_per_epoch_readout_key_and_the_best_trial_holds_its_model(tmp_path):
    out = tmp_path / "asha"
    proc = run_sweep(
        "--depths",
        "2",
        "--width",
        "32",
        "--epochs",
        "2",
        "--batch-size",
        "256",
        "--grid",
        "head.epochs=5",
        "--asha",
        "--output",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = {}  # method -> every report of its trial, in order
    for result in (out / "tune").glob("*/result.json"):
        lines = [json.loads(line) for line in result.read_text().splitlines()]
        reports[lines[0]["config"]["method"]] = lines
    assert sorted(reports) == ["backprop", "hsic"]
    for lines in reports.values():
        epochs = [r for r in lines if not r["final"]]
        assert [r["epoch"] for r in epochs][:1] == [1]  # ASHA's first rung (grace period 1) saw every trial
        # The key ASHA and the Tuner rank by is in every report of both methods, a real accuracy each time.
        assert all(10 < r[METRIC] <= 100 and "test_accuracy_unformatted" in r for r in lines)
    hsic = reports["hsic"]
    assert all(r["readout"] == "least_squares" for r in hsic if not r["final"])
    assert all(r["test_accuracy_unformatted"] is None for r in reports["backprop"])
    # The closed-form readout tracks the format head trained at the end, not the unformatted readout.
    final = hsic[-1]
    assert final["final"] and final["readout"] == "format_head"
    readout = hsic[-2][METRIC]
    assert abs(readout - final[METRIC]) < min(10, abs(readout - final["test_accuracy_unformatted"]))

    with open(out / "results.csv") as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    assert float(rows["hsic"]["test_accuracy"]) == pytest.approx(final[METRIC])
    assert float(rows["hsic"]["test_accuracy_unformatted"]) == pytest.approx(final["test_accuracy_unformatted"])

    # The best trial's Tune checkpoint is its model: load_model reproduces the trial's accuracy.
    ray.init(address="local", num_cpus=1, include_dashboard=False)
    try:
        grid = tune.Tuner.restore(str(out / "tune"), trainable=run_trial).get_results()
    finally:
        shutdown()
    best = grid.get_best_result(metric=METRIC, mode="max")
    assert best.metrics["final"] and best.checkpoint is not None
    with best.checkpoint.as_directory() as directory:
        model = hsic_ray.load_model(directory)
    data = load_dataset(build_config("deep_mlp").data)
    with torch.no_grad():
        got = accuracy(model(to_tensor(data.x_test)), data.y_test)
    assert got == pytest.approx(best.metrics[METRIC], abs=100 / len(data.y_test))
    assert model.method == best.config["method"] and model.config.model.depth == 2


def test_progress_tables_come_at_most_every_period_only_after_a_change_and_once_more_at_the_end(monkeypatch, caplog):
    """SweepProgress's pacing, on a clock the test sets: the end-to-end sweeps can only bound the count of tables
    by their own duration, so the exact rule is pinned here."""
    from types import SimpleNamespace

    from hsic_ray import sweep_progress

    clock = [0.0]
    monkeypatch.setattr(sweep_progress.time, "monotonic", lambda: clock[0])
    trial = SimpleNamespace(trial_id="t0", config={"method": "hsic", "depth": 2}, last_result={}, status="RUNNING")
    progress = sweep_progress.SweepProgress(METRIC, [], every_s=30.0)

    def tables_after(*events: tuple[float, str]) -> int:
        caplog.clear()
        for at, event in events:
            clock[0] = at
            if event == "result":
                progress.on_trial_result(0, [trial], trial, {METRIC: 50.0, "epoch": 1})
            elif event == "end":
                progress.on_experiment_end([trial])
            else:
                progress.on_step_end(0, [trial])
        return sum(record.getMessage().startswith("trials: ") for record in caplog.records)

    with caplog.at_level("INFO", logger="hsic_ray"):
        assert tables_after((0.0, "step")) == 1  # the first step: the sweep's start
        assert tables_after((1.0, "step"), (5.0, "result"), (29.9, "step")) == 0  # changed, but within the period
        assert tables_after((30.0, "step")) == 1  # the period since the last table is up
        assert tables_after((100.0, "step")) == 0  # nothing changed since
        assert tables_after((101.0, "result"), (102.0, "end")) == 1  # the end shows what changed since the last
        assert tables_after((103.0, "end")) == 0  # and only that

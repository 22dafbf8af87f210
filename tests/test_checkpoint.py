"""Checkpoints and resume with the in-process trainer: an interrupted run continues where it stopped."""

import json

import pytest

from hsic_ray import experiment
from hsic_ray.config import ConfigError, build_config
from hsic_ray.data import ImageData, load_dataset
from hsic_ray.experiment import run_hsic
from hsic_ray.local_pipeline import LocalPipeline
from hsic_ray.run import checkpoint
from hsic_ray.run.claim import NothingToResumeError
from hsic_ray.run.directory import RunDirectory


class Crash(RuntimeError):
    pass


@pytest.fixture(scope="module")
def digits():
    full = load_dataset(build_config().data)
    return ImageData("mnist-sample", full.x_train[:1280], full.y_train[:1280], full.x_test[:500], full.y_test[:500], 10)


def config(out, **extra):
    overrides = {
        "model.depth": 1,
        "model.width": 32,
        "train.batch_size": 128,
        "train.epochs": 2,
        "head.epochs": 2,
        "train.checkpoint_every": 4,
        "train.checkpoint_seconds": 0,
        "train.eval_samples": 128,
        "train.monitor_every": 1,  # records from epoch 0 on, which the logs compared here hold
        "output": str(out),
        "trainer": "local",
    }
    return build_config("paper_mlp", overrides={**overrides, **extra})


def crash_after(monkeypatch, steps):
    class CrashingPipeline(LocalPipeline):
        submitted = 0

        def submit(self, batch, factors):
            if CrashingPipeline.submitted == steps:
                raise Crash(f"killed after {steps} steps")
            CrashingPipeline.submitted += 1
            return super().submit(batch, factors)

    monkeypatch.setattr(experiment, "LocalPipeline", CrashingPipeline)


def records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_resumed_run_equals_an_uninterrupted_one(tmp_path, digits, monkeypatch):
    straight = run_hsic(config(tmp_path / "straight"), digits)

    crash_after(monkeypatch, 14)  # 10 steps per epoch: dies in epoch 2, after the checkpoint at step 12
    with pytest.raises(Crash):
        run_hsic(config(tmp_path / "resumed"), digits)
    run = RunDirectory(str(tmp_path / "resumed"))
    assert checkpoint.latest_step(run) == 12
    assert not run.exists("metrics.json")
    monkeypatch.undo()

    resumed = run_hsic(config(tmp_path / "resumed"), digits)
    assert resumed["steps"] == straight["steps"] == 20
    assert resumed["per_layer"] == straight["per_layer"]
    assert resumed["test_accuracy_formatted"] == straight["test_accuracy_formatted"]
    log = records(tmp_path / "resumed")
    resume = [r for r in log if r["kind"] == "resume"]
    assert resume == [{"kind": "resume", "step": 12, "epoch": 2, "batch": 2}]
    # Steps 13 and up ran once after the resume; steps 1-12 were not redone.
    steps_logged = [r["step"] for r in log if r["kind"] == "step"]
    assert steps_logged.count(10) == 1
    # The per-epoch probes of before the crash came back with the checkpoint (probes.png draws them all).
    assert [r["epoch"] for r in log if r["kind"] == "probes"] == [0, 1, 2]
    final_state = checkpoint.load_state(run, checkpoint.coordinator_file(20))
    assert [r["epoch"] for r in final_state["probes"]] == [0, 1, 2]
    assert resumed["probes"]["test_accuracy"] == straight["probes"]["test_accuracy"]


def test_old_checkpoints_are_pruned_and_incomplete_ones_ignored(tmp_path, digits):
    run_hsic(config(tmp_path / "run"), digits)
    run = RunDirectory(str(tmp_path / "run"))
    assert checkpoint.complete_steps(run) == [16, 20]
    # A directory without a manifest (a crash mid-write) is never taken as a checkpoint.
    run.write_bytes(checkpoint.stage_file(24, 0), b"partial")
    assert checkpoint.complete_steps(run) == [16, 20]


def tree(root):
    """Every file under root with its bytes: to show that a failed start changed nothing."""
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_unloadable_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, digits, monkeypatch):
    """A damaged newest checkpoint is set aside (kept, renamed) and the run continues from the one before,
    ending where an uninterrupted run ends."""
    straight = run_hsic(config(tmp_path / "straight", **{"train.checkpoint_every": 2}), digits)
    crash_after(monkeypatch, 7)
    with pytest.raises(Crash):
        run_hsic(config(tmp_path / "run", **{"train.checkpoint_every": 2}), digits)
    monkeypatch.undo()
    run = RunDirectory(str(tmp_path / "run"))
    assert checkpoint.complete_steps(run) == [4, 6]
    stage = tmp_path / "run" / checkpoint.stage_file(6, 0)
    damaged = stage.read_bytes()[:100]
    stage.write_bytes(damaged)
    resumed = run_hsic(config(tmp_path / "run", **{"train.checkpoint_every": 2}), digits)
    assert [r for r in records(tmp_path / "run") if r["kind"] == "resume"][0]["step"] == 4
    assert (tmp_path / "run" / "checkpoints" / "unreadable-step-00000006" / "stage-000.pt").read_bytes() == damaged
    assert resumed["steps"] == straight["steps"] and resumed["per_layer"] == straight["per_layer"]


def test_no_loadable_checkpoint_stops_before_anything_is_written(tmp_path, digits, monkeypatch):
    crash_after(monkeypatch, 6)
    with pytest.raises(Crash):
        run_hsic(config(tmp_path / "run"), digits)
    monkeypatch.undo()
    stage = tmp_path / "run" / checkpoint.stage_file(4, 0)
    stage.write_bytes(stage.read_bytes()[:100])
    before = tree(tmp_path / "run")
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint in .* can be loaded .*stage-000.pt is corrupt"):
        run_hsic(config(tmp_path / "run"), digits)
    assert tree(tmp_path / "run") == before


def test_rerun_of_a_run_that_crashed_before_its_first_checkpoint_says_so(tmp_path, digits, monkeypatch):
    crash_after(monkeypatch, 2)
    with pytest.raises(Crash):
        run_hsic(config(tmp_path / "run"), digits)
    monkeypatch.undo()
    crashed = records(tmp_path / "run")
    with pytest.raises(ConfigError, match="different optim settings"):
        run_hsic(config(tmp_path / "run", **{"optim.lr": 0.5}), digits)
    run_hsic(config(tmp_path / "run"), digits)
    log = records(tmp_path / "run")
    assert log[: len(crashed)] == crashed and log[len(crashed)] == {
        "kind": "restart",
        "reason": "no complete checkpoint",
    }


def test_resume_refuses_different_settings(tmp_path, digits, monkeypatch):
    crash_after(monkeypatch, 5)
    with pytest.raises(Crash):
        run_hsic(config(tmp_path / "run"), digits)
    monkeypatch.undo()
    with pytest.raises(ConfigError, match="different model settings"):
        run_hsic(config(tmp_path / "run", **{"model.width": 64}), digits)


def test_resume_flag_needs_a_run_and_creates_nothing(tmp_path, digits):
    with pytest.raises(NothingToResumeError, match="holds no run to continue"):
        run_hsic(config(tmp_path / "run"), digits, resume=True)
    assert not (tmp_path / "run").exists()


def test_resume_follows_complete_checkpoints_not_the_latest_pointer(tmp_path, digits):
    run_hsic(config(tmp_path / "run"), digits)
    run = RunDirectory(str(tmp_path / "run"))
    run.write_text("checkpoints/LATEST", "40\n")
    assert checkpoint.resume_point(run) == (20, {})

"""The backprop baseline on Ray Train (real Ray, real bundled digits): training, outputs, checkpoints, resume."""

import json
import os
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest
import ray
import torch

import hsic_ray
from hsic_ray.config import ConfigError, build_config, save_config
from hsic_ray.data import to_tensor
from hsic_ray.distributed.shutdown import shutdown
from hsic_ray.evaluation import accuracy
from hsic_ray.experiment import run_backprop
from hsic_ray.run.claim import NothingToResumeError, OutputExistsError
from hsic_ray.train_backprop import CHECKPOINT_NAME, RAY_TRAIN_DIR, RUN_NAME, SNAPSHOT_FILE, train_backprop

# One Ray cluster for the module (its fixture): its tests run on one pytest-xdist worker.
pytestmark = pytest.mark.xdist_group("train_backprop")

KEYS = (
    "test_accuracy_formatted",
    "test_accuracy_unformatted",
    "train_seconds",
    "steps",
    "samples_per_second",
    "epochs",
    "grad_norms",
)
STEPS_PER_EPOCH = 2000 // 128  # the `digits` fixture's 2000 training samples in full batches of 128


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(address="local", num_cpus=4, num_gpus=0, include_dashboard=False)
    yield
    shutdown()


def small_config(out, **extra):
    overrides = {
        "model.depth": 2,
        "model.width": 64,
        "train.batch_size": 128,
        "train.epochs": 3,
        "backprop.lr": 0.05,
        "train.log_every": 5,
        "output": str(out),
    }
    overrides.update(extra)
    return build_config("paper_mlp", overrides=overrides)


def epoch_records(out):
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if r["kind"] == "epoch"], [r for r in lines if r["kind"] == "resume"]


@pytest.mark.slow
def test_two_workers_train_checkpoint_every_epoch_and_continue_past_a_torn_checkpoint(tmp_path, digits, ray_cluster):
    out = tmp_path / "run"
    metrics = train_backprop(small_config(out), digits, workers=2)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics))
    assert all(key in saved for key in KEYS)
    assert saved["test_accuracy_formatted"] > 70  # chance is 10%
    assert saved["test_accuracy_unformatted"] is None
    # The global batch is split over the workers: as many steps as the in-process baseline.
    assert saved["steps"] == 3 * STEPS_PER_EPOCH and saved["epochs"] == 3 and saved["workers"] == 2
    assert saved["train_seconds"] > 0 and saved["samples_per_second"] > 0
    assert len(saved["grad_norms"]) == 4 and all(g > 0 for g in saved["grad_norms"])  # depth 2 + 2 layers
    assert saved["resumed_from"] == []
    # model.pt, from the last Ray Train checkpoint, reproduces the reported accuracy from raw images.
    model = hsic_ray.load_model(out)
    with torch.no_grad():
        assert accuracy(model(to_tensor(digits.x_test)), digits.y_test) == saved["test_accuracy_formatted"]

    records, resumes = epoch_records(out)
    assert [r["epoch"] for r in records] == [1, 2, 3] and not resumes
    assert [r["step"] for r in records] == [STEPS_PER_EPOCH * e for e in (1, 2, 3)]
    assert all(len(r["grad_norms"]) == 4 and all(g > 0 for g in r["grad_norms"]) for r in records)
    assert records[-1]["grad_norms"] == saved["grad_norms"]
    assert records[-1]["loss"] < records[0]["loss"]

    # A checkpoint per epoch under the storage path; Ray Train kept the latest two.
    storage = out / RAY_TRAIN_DIR / RUN_NAME
    kept = sorted(p.name for p in storage.iterdir() if p.name.startswith("checkpoint_epoch"))
    assert kept == [f"checkpoint_epoch{e:05d}_step{STEPS_PER_EPOCH * e:09d}_attempt0" for e in (2, 3)]
    assert saved["checkpoint"].endswith(kept[-1])
    state = torch.load(storage / kept[-1] / "state.pt", weights_only=True)
    assert {"model", "optimizer", "epoch", "steps"} <= set(state) and state["epoch"] == 3
    assert (storage / SNAPSHOT_FILE).is_file()
    assert (out / "grad_norms.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "depth: 2" in (out / "config.yaml").read_text()

    # A finished run is never written over.
    with pytest.raises(OutputExistsError, match="already holds a finished run"):
        train_backprop(small_config(out), digits, workers=2)

    # Without metrics.json (its driver died after the last checkpoint) it continues, here for a fourth epoch,
    # from the newest checkpoint that loads: the one before a torn one.
    (out / "metrics.json").unlink()
    (storage / kept[-1] / "state.pt").write_bytes(b"torn")
    metrics = train_backprop(small_config(out, **{"train.epochs": 4}), digits, workers=2)
    records, resumes = epoch_records(out)
    assert [r["epoch"] for r in resumes] == [2]
    assert [r["epoch"] for r in records] == [1, 2, 3, 4] and metrics["steps"] == 4 * STEPS_PER_EPOCH


def _kill_workers_after_first_checkpoint(storage: Path, deadline_s: float = 120.0) -> list[int]:
    """SIGKILL this test's Ray Train worker processes (children of this process's raylet) once a checkpoint
    is registered; returns their pids."""
    snapshot = storage / SNAPSHOT_FILE
    deadline = time.monotonic() + deadline_s
    while not snapshot.exists():
        assert time.monotonic() < deadline, "no checkpoint was registered"
        time.sleep(0.02)
    workers = [p for p in psutil.Process().children(recursive=True) if "RayTrainWorker" in " ".join(p.cmdline())]
    for proc in workers:
        os.kill(proc.pid, signal.SIGKILL)
    return [p.pid for p in workers]


@pytest.mark.slow
def test_killed_run_resumes_from_its_checkpoint_and_matches_an_uninterrupted_run(tmp_path, digits, ray_cluster):
    epochs = 8
    out = tmp_path / "run"
    # A cosine schedule: the resumed run must take each step at the same learning rate as an uninterrupted one.
    settings = {"train.epochs": epochs, "backprop.schedule": "cosine"}
    cfg = small_config(out, **settings)
    outcome = {}

    def first_attempt():
        try:
            outcome["metrics"] = train_backprop(cfg, digits, workers=1)
        except Exception as exc:  # the worker's death surfaces as a Ray Train failure
            outcome["error"] = exc

    thread = threading.Thread(target=first_attempt)
    thread.start()
    killed = _kill_workers_after_first_checkpoint(out / RAY_TRAIN_DIR / RUN_NAME)
    thread.join(timeout=120)
    assert killed and not thread.is_alive()
    assert isinstance(outcome.get("error"), ray.train.TrainingFailedError), outcome
    assert not (out / "metrics.json").exists()
    written = [CHECKPOINT_NAME.fullmatch(p.name) for p in (out / RAY_TRAIN_DIR / RUN_NAME).iterdir()]
    newest = max(int(m["epoch"]) for m in written if m)

    # Rerunning on the same output continues from the latest checkpoint (--resume insists on one): the newest
    # written, or the one before where the kill cut the newest short.
    metrics = train_backprop(cfg, digits, workers=1, resume=True)
    assert len(metrics["resumed_from"]) == 1
    resumed_epoch = metrics["resumed_from"][0]["epoch"]
    assert resumed_epoch in (newest, newest - 1) and 1 <= resumed_epoch < epochs
    assert metrics["resumed_from"][0]["step"] == resumed_epoch * STEPS_PER_EPOCH
    records, resumes = epoch_records(out)
    # Every epoch trained once: those before the checkpoint in the first attempt, the rest after the resume.
    assert [r["epoch"] for r in records] == list(range(1, epochs + 1))
    assert [r["step"] for r in records] == [STEPS_PER_EPOCH * e for e in range(1, epochs + 1)]
    assert len(resumes) == 1 and resumes[0]["epoch"] == resumed_epoch
    assert metrics["steps"] == epochs * STEPS_PER_EPOCH and metrics["epochs"] == epochs

    # Same seed, same batches, model and optimizer state restored: the in-process baseline (one thread, like
    # the Ray Train worker) reaches the same result without an interruption.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        baseline = run_backprop(small_config(tmp_path / "inprocess", **settings), digits)
    finally:
        torch.set_num_threads(threads)
    assert baseline["steps"] == metrics["steps"]
    assert baseline["test_accuracy_formatted"] == pytest.approx(metrics["test_accuracy_formatted"], abs=0.2)
    baseline_records, _ = epoch_records(tmp_path / "inprocess")
    for ours, theirs in zip(records, baseline_records, strict=True):
        assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-4)
        assert ours["grad_norms"] == pytest.approx(theirs["grad_norms"], rel=1e-3)


def test_resume_refuses_a_run_with_other_settings_or_no_checkpoint(tmp_path, digits):
    out = tmp_path / "run"
    with pytest.raises(NothingToResumeError, match="holds no run to continue"):
        train_backprop(small_config(out), digits, resume=True)
    assert not out.exists()
    (out / RAY_TRAIN_DIR / RUN_NAME).mkdir(parents=True)
    (out / RAY_TRAIN_DIR / RUN_NAME / SNAPSHOT_FILE).write_text("{}")
    (out / "config.yaml").write_text(save_config(small_config(out, **{"model.depth": 3})))
    with pytest.raises(ConfigError, match="different model settings"):
        train_backprop(small_config(out), digits)
    with pytest.raises(ConfigError, match="at least 2 samples"):
        train_backprop(small_config(tmp_path / "other", **{"train.batch_size": 4}), digits, workers=3)

"""`--tensorboard`: a tiny real run writes event files whose scalars hold per-layer nHSIC and the accuracies."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from hsic_ray.config import ConfigError, build_config
from hsic_ray.experiment import run_hsic

JOB = Path(__file__).resolve().parents[1] / "jobs" / "train_deep.py"


def test_tensorboard_flag_writes_per_layer_nhsic_and_final_accuracy(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, str(JOB), "--smoke-test", "--trainer", "local", "--tensorboard", "--output", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    layers = len(metrics["per_layer"])  # smoke test: depth 1, so 3 HSIC-trained layers

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for i in range(layers):
        assert {f"nhsic_zx/layer_{i:02d}", f"nhsic_zy/layer_{i:02d}", f"eval_nhsic_zx/layer_{i:02d}"} <= tags
    assert {"train/loss", "train/samples_per_second", "head/loss"} <= tags
    last = [e.value for e in events.Scalars(f"eval_nhsic_zy/layer_{layers - 1:02d}")][-1]
    assert abs(last - metrics["per_layer"][-1]["nhsic_zy"]) < 1e-6
    [final] = events.Scalars("accuracy/test_accuracy_formatted")
    assert abs(final.value - metrics["test_accuracy_formatted"]) < 1e-4 and final.step == metrics["steps"] == 4
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4]  # every log step (log_every 2)


def test_tensorboard_is_off_unless_asked_and_missing_package_stops_the_run_before_any_file(
    tmp_path, monkeypatch, digits
):
    assert build_config().train.tensorboard is False
    cfg = build_config(overrides={"train.tensorboard": True, "trainer": "local", "output": str(tmp_path / "run")})
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed: importing it raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'hsic-ray\[tensorboard\]'"):
        run_hsic(cfg, digits)
    assert not (tmp_path / "run").exists()

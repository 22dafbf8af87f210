"""The Ray pipeline with stages that hold GPU shares, on a real local Ray cluster that declares one GPU.

On a machine with CUDA the stages train on the GPU they share, against the in-process trainer on the same
GPU (`benchmarks/gpu_session.sh` runs this on a lent GPU). Without CUDA the GPU is a declared resource only:
the stages hold their shares and train on CPU, which checks what having GPUs changes in the plan (the
first stage computes the targets by default) against the in-process trainer on CPU.
"""

import json

import pytest
import ray
import torch

from hsic_ray.config import build_config
from hsic_ray.experiment import run_hsic

CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module", autouse=True)
def local_ray_with_a_gpu():
    ray.init(address="local", num_cpus=5, num_gpus=1, include_dashboard=False)
    yield
    ray.shutdown()


def config(out, trainer, **extra):
    overrides = {
        "trainer": trainer, "output": str(out), "model.depth": 2, "model.width": 64, "train.batch_size": 128,
        "train.epochs": 1, "head.epochs": 2, "train.eval_samples": 256, "train.log_every": 5,
        "train.device": "cuda" if CUDA else "cpu", "ray.stages": 2, "ray.gpus_per_stage": 0.5,
    }  # fmt: skip
    return build_config("paper_mlp", overrides={**overrides, **extra})


@pytest.mark.parametrize("grouping", [
    {"ray.max_in_flight": 1, "ray.batches_per_call": 1},  # targets on the first stage: the default with GPUs
    {"ray.batches_per_call": 3},
    {"ray.batches_per_call": 2, "ray.targets_on": "coordinator"},  # on the host: float32 factors, not float64
])
def test_stages_holding_gpu_shares_reproduce_the_in_process_trainer(tmp_path, digits, grouping, caplog):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the stage actors' thread count: BLAS rounds differently with another
    try:
        local = run_hsic(config(tmp_path / "local", "local"), digits)
    finally:
        torch.set_num_threads(threads)
    with caplog.at_level("INFO", logger="hsic_ray"):
        piped = run_hsic(config(tmp_path / "ray", "ray", **grouping), digits)
    where = grouping.get("ray.targets_on", "first_stage").replace("_", " ")
    assert f"targets on the {where}" in caplog.text
    placements = json.loads((tmp_path / "ray" / "placements.json").read_text())
    assert [p["device"].split(":")[0] for p in placements] == ["cuda" if CUDA else "cpu"] * 2
    assert all(len(p["gpu_ids"]) == 1 for p in placements)  # each stage holds its share of the one GPU
    assert piped["stages"] == 2 and local["steps"] == piped["steps"] == 15
    # On a GPU, batched products over a stage's 2 layers need not round as over the trainer's 4, and targets
    # from the host's float32 factors differ from the GPU's float64 ones in the last bits.
    rel = 1e-3 if CUDA else 1e-4
    for a, b in zip(local["per_layer"], piped["per_layer"]):
        assert b["nhsic_zx"] == pytest.approx(a["nhsic_zx"], rel=10 * rel)
        assert b["nhsic_zy"] == pytest.approx(a["nhsic_zy"], rel=10 * rel)
    local_steps = [json.loads(line) for line in (tmp_path / "local" / "metrics.jsonl").read_text().splitlines()]
    ray_steps = [json.loads(line) for line in (tmp_path / "ray" / "metrics.jsonl").read_text().splitlines()]
    local_losses = [r["loss"] for r in local_steps if r["kind"] == "step"]
    ray_losses = [r["loss"] for r in ray_steps if r["kind"] == "step"]
    assert len(local_losses) == len(ray_losses) == 3
    assert ray_losses == pytest.approx(local_losses, rel=rel)
    assert piped["test_accuracy_unformatted"] == pytest.approx(local["test_accuracy_unformatted"], abs=0.5)

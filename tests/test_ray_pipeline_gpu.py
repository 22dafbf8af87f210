"""The Ray pipeline with stages that hold GPU shares, on a real local Ray cluster that declares one GPU.

On a machine with CUDA the stages train on the GPU they share, against the in-process trainer on the same
GPU (`benchmarks/gpu_session.sh` runs this on a lent GPU). Without CUDA the GPU is a declared resource only:
the stages hold their shares and train on CPU, which checks what having GPUs changes in the plan (the
first stage computes the factors by default) against the in-process trainer on CPU.
"""

import json

import pytest
import ray
import torch
from test_ray_pipeline import assert_same_training, config, records, run_local_and_ray  # the CPU pipeline's run

from hsic_ray.distributed.shutdown import shutdown
from hsic_ray.machine import mps_running

# One Ray cluster for the module (its fixture): its tests run on one pytest-xdist worker.
pytestmark = pytest.mark.xdist_group("ray_pipeline_gpu")

CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module", autouse=True)
def local_ray_with_a_gpu():
    ray.init(address="local", num_cpus=5, num_gpus=1, include_dashboard=False)
    yield
    shutdown()


def gpu_config(out, trainer, **extra):
    """test_ray_pipeline's small run, on the GPU where there is one, its two stages sharing the GPU."""
    return config(out, trainer, **{"train.device": "cuda" if CUDA else "cpu", "ray.gpus_per_stage": 0.5, **extra})


@pytest.mark.parametrize(
    "grouping",
    [
        {"ray.max_in_flight": 1, "ray.batches_per_call": 1},  # factors on the first stage: the default with GPUs
        {"ray.batches_per_call": 3},
        {"ray.batches_per_call": 2, "ray.factors_on": "coordinator"},  # on the host: float32 factors, not float64
    ],
)
def test_stages_holding_gpu_shares_reproduce_the_in_process_trainer(tmp_path, digits, grouping, caplog):
    with caplog.at_level("INFO", logger="hsic_ray"):
        local, piped = run_local_and_ray(tmp_path, digits, gpu_config, grouping)
    where = grouping.get("ray.factors_on", "first_stage").replace("_", " ")
    assert f"factors on the {where}" in caplog.text
    placements = json.loads((tmp_path / "ray" / "placements.json").read_text())
    assert [p["device"].split(":")[0] for p in placements] == ["cuda" if CUDA else "cpu"] * 2
    assert all(len(p["gpu_ids"]) == 1 for p in placements)  # each stage holds its share of the one GPU
    assert ("without NVIDIA MPS" in caplog.text) == (CUDA and not mps_running())  # time-sliced: the user is told
    assert piped["stages"] == 2 and len(records(tmp_path / "ray", "step")) == 3
    # On a GPU, batched products over a stage's 2 layers need not round as over the trainer's 4, and factors
    # from the host's float32 factors differ from the GPU's float64 ones in the last bits.
    assert_same_training(tmp_path, local, piped, rel=1e-3 if CUDA else 1e-4)

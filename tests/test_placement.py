"""Stage planning: balanced partitions, resources per stage, the fit check (on a real local Ray), and the advice
for stages that share a GPU."""

import itertools
import os

import pytest
import ray

from hsic_ray.config import RayConfig, build_config
from hsic_ray.distributed.placement import (
    PlacementError,
    StageSpec,
    bundles,
    check_fits,
    gpu_sharing_advice,
    partition,
    plan_stages,
)
from hsic_ray.distributed.shutdown import shutdown
from hsic_ray.machine import mps_running
from hsic_ray.models import build_network, layer_step_costs

# One Ray cluster for the module (its fixture): its tests run on one pytest-xdist worker.
pytestmark = pytest.mark.xdist_group("placement")


def brute_force_best(costs, stages):
    n = len(costs)
    best = float("inf")
    for cuts in itertools.combinations(range(1, n), stages - 1):
        edges = (0, *cuts, n)
        best = min(best, max(sum(costs[a:b]) for a, b in zip(edges, edges[1:])))
    return best


@pytest.mark.parametrize("costs", [[5, 1, 1, 1, 1, 5], [1, 2, 3, 4, 5, 6, 7], [9, 1, 1, 1], [1] * 7])
@pytest.mark.parametrize("stages", [1, 2, 3, 4])
def test_partition_is_contiguous_complete_and_optimal(costs, stages):
    bounds = partition(costs, stages)
    assert len(bounds) == stages
    assert bounds[0][0] == 0 and bounds[-1][1] == len(costs)
    assert all(a < b for a, b in bounds) and all(b == c for (_, b), (c, _) in zip(bounds, bounds[1:]))
    assert max(sum(costs[a:b]) for a, b in bounds) == brute_force_best(costs, stages)


def test_partition_balances_compute_not_layer_count():
    # The paper MLP's first layer (784 -> 1024) and hidden layers cost far more than the 1024 -> 10 output.
    cfg = build_config("paper_mlp")
    net = build_network(cfg.model, (1, 28, 28))
    costs = layer_step_costs(net, 256)
    assert costs[0] > costs[-1] and costs[1] > costs[-1]
    bounds = partition(costs, 2)
    # Equal counts would be 4 + 3 layers; balancing compute gives the cheap output layer's stage one more.
    assert bounds == [(0, 3), (3, 7)]


def test_partition_rejects_more_stages_than_layers():
    with pytest.raises(ValueError, match="cannot split 3 layers into 4"):
        partition([1, 1, 1], 4)


def test_plan_uses_one_stage_per_gpu_when_the_cluster_has_gpus():
    specs = plan_stages(RayConfig(), [1.0] * 7, {"CPU": 16, "GPU": 4})
    assert [s.num_gpus for s in specs] == [1.0] * 4
    assert [s.layers for s in specs][0].start == 0 and specs[-1].stop == 7


def test_plan_on_cpus_leaves_the_coordinator_its_cpu_and_honours_fractions():
    assert len(plan_stages(RayConfig(), [1.0] * 7, {"CPU": 4, "GPU": 0})) == 3
    half = plan_stages(RayConfig(stages=4, gpus_per_stage=0.5), [1.0] * 7, {"CPU": 8, "GPU": 2})
    assert [s.num_gpus for s in half] == [0.5] * 4
    assert bundles(half, 1.0)[0] == {"CPU": 1.0} and bundles(half, 1.0)[1] == {"CPU": 1.0, "GPU": 0.5}


@pytest.fixture(scope="module")
def four_cpu_ray():
    ray.init(address="local", num_cpus=4, num_gpus=0, include_dashboard=False)
    yield
    shutdown()


def where(node_ip, device, gpu_ids, mps=False):
    return {"node_ip": node_ip, "device": device, "gpu_ids": gpu_ids, "mps": mps}


def test_advice_names_the_stages_that_share_a_gpu_without_mps():
    placements = [
        where("10.0.0.1", "cuda:0", ["0"]),
        where("10.0.0.1", "cuda:0", ["0"]),
        where("10.0.0.1", "cuda:0", ["1"]),  # a GPU of its own
        where("10.0.0.2", "cuda:0", ["0"]),  # GPU 0 of another node
    ]
    advice = gpu_sharing_advice(placements)
    assert "stages 0, 1 on GPU 0 of 10.0.0.1" in advice and "nvidia-cuda-mps-control -d" in advice
    assert "stages 2" not in advice and "stages 3" not in advice and "10.0.0.2" not in advice


@pytest.mark.parametrize(
    "placements",
    [
        [where("n", "cuda:0", ["0"], mps=True), where("n", "cuda:0", ["0"], mps=True)],  # MPS runs them side by side
        [where("n", "cuda:0", ["0"]), where("n", "cuda:0", ["1"])],  # one GPU each
        [where("n", "cpu", ["0"]), where("n", "cpu", ["0"])],  # a GPU declared, the stages on the CPU
    ],
)
def test_no_advice_where_no_cuda_device_is_time_sliced(placements):
    assert gpu_sharing_advice(placements) is None


def test_mps_is_seen_by_its_control_pipe(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", str(tmp_path))
    assert not mps_running()
    os.mkfifo(tmp_path / "control")  # what the control daemon makes when it starts
    assert mps_running()


def test_fit_check_names_what_is_needed_and_what_the_cluster_has(four_cpu_ray):
    specs = [StageSpec(i, i, i + 1, 1.0, 1.0) for i in range(3)]
    with pytest.raises(PlacementError) as err:
        check_fits(specs, 1.0, "PACK")
    message = str(err.value)
    assert "4 CPU, 3 GPU" in message and "the cluster has 4 CPU, 0 GPU on 1 node(s)" in message
    assert "lower --stages" in message
    with pytest.raises(PlacementError, match="STRICT_SPREAD puts each bundle on its own node"):
        check_fits([StageSpec(0, 0, 1, 1.0, 0.0)], 1.0, "STRICT_SPREAD")
    check_fits([StageSpec(i, i, i + 1, 1.0, 0.0) for i in range(3)], 1.0, "STRICT_PACK")  # fits: no error

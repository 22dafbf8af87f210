"""Several Ray nodes on this machine (ray.cluster_utils.Cluster): stages spread over nodes, a node lost
mid-run, and logical GPUs without CUDA."""

import json
import threading
import time

import pytest
import ray
from ray.cluster_utils import Cluster

from hsic_ray.config import build_config
from hsic_ray.experiment import run_hsic

pytestmark = pytest.mark.slow


@pytest.fixture
def cluster():
    # The head gets no CPU, so every bundle lands on a worker node that the test may remove.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def config(out, **extra):
    overrides = {
        "trainer": "ray",
        "output": str(out),
        "model.depth": 2,
        "model.width": 256,
        "train.batch_size": 256,
        "train.epochs": 2,
        "head.epochs": 3,
        "train.checkpoint_every": 20,
        "ray.stages": 2,
        "ray.strategy": "SPREAD",
    }
    return build_config("paper_mlp", overrides={**overrides, **extra})


def records(out, kind):
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def test_stages_spread_over_nodes_and_survive_losing_one(tmp_path, all_digits, cluster):
    # Coordinator + 2 stages take three one-CPU workers; the fourth is room for a stage whose node is lost.
    workers = [cluster.add_node(num_cpus=1) for _ in range(4)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)

    undisturbed = run_hsic(config(tmp_path / "calm"), all_digits)
    placements = json.loads((tmp_path / "calm" / "placements.json").read_text())
    assert len({p["node_id"] for p in placements}) == 2  # SPREAD: two stages, two nodes

    lost: list[str] = []

    def remove_a_stage_node():
        deadline = time.time() + 120
        placements_file = tmp_path / "hit" / "placements.json"
        while time.time() < deadline and not (tmp_path / "hit" / "checkpoints" / "LATEST").exists():
            time.sleep(0.05)
        node_id = json.loads(placements_file.read_text())[1]["node_id"]
        for node in workers:
            if node.node_id == node_id:
                cluster.remove_node(node)
                lost.append(node_id)

    remover = threading.Thread(target=remove_a_stage_node)
    remover.start()
    disturbed = run_hsic(config(tmp_path / "hit"), all_digits)
    remover.join()
    assert lost, "the node hosting stage 1 was not found"
    assert disturbed["recoveries"] >= 1 and disturbed["steps"] == undisturbed["steps"]
    recovery = records(tmp_path / "hit", "recovery")[0]
    assert recovery["stage"] == 1 and recovery["restored_from_step"] is not None
    final = json.loads((tmp_path / "hit" / "placements.json").read_text())
    assert final[1]["node_id"] != lost[0]
    assert abs(disturbed["test_accuracy_unformatted"] - undisturbed["test_accuracy_unformatted"]) <= 2.0


def test_logical_gpus_get_one_stage_each_and_train_on_cpu_without_cuda(tmp_path, digits, cluster):
    cluster.add_node(num_cpus=5, num_gpus=4)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    overrides = {
        "ray.stages": None,
        "ray.strategy": "PACK",
        "model.width": 64,
        "train.batch_size": 128,
        "train.epochs": 1,
    }
    metrics = run_hsic(config(tmp_path / "run", **overrides), digits)
    placements = json.loads((tmp_path / "run" / "placements.json").read_text())
    assert metrics["stages"] == 4 and len(placements) == 4
    assert sorted(g for p in placements for g in p["gpu_ids"]) == ["0", "1", "2", "3"]
    assert {p["device"] for p in placements} == {"cpu"}
    assert [p["layers"] for p in placements] == [[0, 1], [1, 2], [2, 3], [3, 4]]

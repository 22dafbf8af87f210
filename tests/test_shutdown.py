"""A job's Ray shutdown: a cluster it started stops whole, its autoscaler monitor killed first rather than
waited for; a cluster it joined keeps running."""

import json
import subprocess
import sys

import psutil
import ray
from ray.cluster_utils import Cluster

from hsic_ray.distributed.shutdown import shutdown, started_monitor

STARTED_HERE = """
import json
import ray
from hsic_ray.distributed.shutdown import kill_started_monitor, shutdown, started_monitor
from ray._private import worker

ray.init(num_cpus=1, include_dashboard=False)
monitor = started_monitor()
pids = [info.process.pid for infos in worker._global_node.all_processes.values() for info in infos]
kill_started_monitor()
killed_code = monitor.returncode
still_runs = ray.get(ray.remote(lambda: "ran").remote())
shutdown()
print(json.dumps({"monitor": monitor.pid, "killed_code": killed_code, "still_runs": still_runs, "pids": pids,
                  "initialized": ray.is_initialized()}))
"""


def test_a_cluster_started_here_stops_whole_its_monitor_killed_first():
    done = subprocess.run([sys.executable, "-c", STARTED_HERE], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.splitlines()[-1])
    assert report["monitor"] in report["pids"]
    assert report["killed_code"] == -9  # dead before ray.shutdown began: not asked to stop, nor waited for
    assert report["still_runs"] == "ran"  # the cluster works on without it
    assert not report["initialized"]
    alive = [pid for pid in report["pids"] if psutil.pid_exists(pid)]
    assert alive == [], f"Ray processes left running after shutdown: {alive}"


def test_a_joined_cluster_keeps_its_monitor():
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        ray.init(address=cluster.address)
        assert started_monitor() is None  # this driver started none of the cluster's processes
        shutdown()
        assert not ray.is_initialized()
        head = cluster.head_node.all_processes
        assert "monitor" in head
        assert all(info.process.poll() is None for infos in head.values() for info in infos)
    finally:
        ray.shutdown()
        cluster.shutdown()

"""Which layers go on which stage, what each stage needs, and reserving it on the cluster.

One placement group per run: bundle 0 is the coordinator's, bundle s + 1 is stage s's. A Ray Tune trial
declares the same layout up front (see `bundles`), and the pipeline then uses the trial's group.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, get_current_placement_group, placement_group

from hsic_ray.config import RayConfig
from hsic_ray.errors import PlacementError


@dataclass(frozen=True)
class StageSpec:
    index: int
    start: int  # first layer (inclusive)
    stop: int  # last layer (exclusive)
    num_cpus: float
    num_gpus: float

    @property
    def layers(self) -> range:
        return range(self.start, self.stop)

    def bundle(self) -> dict[str, float]:
        resources = {"CPU": self.num_cpus}
        if self.num_gpus > 0:
            resources["GPU"] = self.num_gpus
        return resources


def partition(costs: Sequence[float], num_stages: int) -> list[tuple[int, int]]:
    """Split layers into `num_stages` contiguous, non-empty runs minimising the most expensive run.

    Dynamic programming over (layers, stages): O(stages * layers^2), instant for any real depth.
    """
    n = len(costs)
    if not 1 <= num_stages <= n:
        raise ValueError(f"cannot split {n} layers into {num_stages} non-empty stages")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[s][i]: the smallest possible maximum stage cost for the first i layers in s stages.
    best = [[inf] * (n + 1) for _ in range(num_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0.0
    for s in range(1, num_stages + 1):
        for i in range(s, n + 1):
            for j in range(s - 1, i):
                value = max(best[s - 1][j], prefix[i] - prefix[j])
                if value < best[s][i]:
                    best[s][i], cut[s][i] = value, j
    bounds, i = [], n
    for s in range(num_stages, 0, -1):
        bounds.append((cut[s][i], i))
        i = cut[s][i]
    return bounds[::-1]


def cluster_totals() -> dict[str, float]:
    return {"CPU": ray.cluster_resources().get("CPU", 0.0), "GPU": ray.cluster_resources().get("GPU", 0.0)}


def plan_stages(cfg: RayConfig, costs: Sequence[float], totals: dict[str, float]) -> list[StageSpec]:
    """Stage count, per-stage resources and layer ranges for this cluster (`totals`: its CPU and GPU)."""
    gpus = cfg.gpus_per_stage if cfg.gpus_per_stage is not None else (1.0 if totals["GPU"] >= 1 else 0.0)
    stages = cfg.stages
    if stages is None:
        if gpus > 0:
            stages = int(totals["GPU"] // gpus)
        else:
            stages = int((totals["CPU"] - cfg.coordinator_cpus) // cfg.cpus_per_stage)
        stages = max(1, min(stages, len(costs)))
    bounds = partition(costs, stages)
    return [StageSpec(i, a, b, cfg.cpus_per_stage, gpus) for i, (a, b) in enumerate(bounds)]


def bundles(specs: Sequence[StageSpec], coordinator_cpus: float) -> list[dict[str, float]]:
    """The placement group's bundles: the coordinator's first, then one per stage."""
    return [{"CPU": coordinator_cpus}] + [spec.bundle() for spec in specs]


def _fits_a_node(bundle: dict[str, float], nodes: list[dict[str, float]]) -> bool:
    return any(all(node.get(k, 0.0) >= v for k, v in bundle.items()) for node in nodes)


def check_fits(specs: Sequence[StageSpec], coordinator_cpus: float, strategy: str) -> None:
    """Fail before any actor starts when the cluster cannot hold the plan, naming need and capacity."""
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    wanted = bundles(specs, coordinator_cpus)
    need = {k: sum(b.get(k, 0.0) for b in wanted) for k in ("CPU", "GPU")}
    have = {k: sum(n.get(k, 0.0) for n in nodes) for k in ("CPU", "GPU")}
    summary = (
        f"{len(specs)} stages x {specs[0].bundle()} + coordinator {{'CPU': {coordinator_cpus}}} = "
        f"{need['CPU']:g} CPU, {need['GPU']:g} GPU; the cluster has {have['CPU']:g} CPU, {have['GPU']:g} GPU "
        f"on {len(nodes)} node(s)"
    )
    fix = "lower --stages, --gpus-per-stage or --cpus-per-stage, or add nodes"
    if any(need[k] > have[k] for k in need):
        raise PlacementError(f"the run needs more than the cluster has: {summary}; {fix}")
    if not all(_fits_a_node(b, nodes) for b in wanted):
        raise PlacementError(f"a stage's bundle fits on no single node: {summary}; {fix}")
    if strategy == "STRICT_SPREAD" and len(wanted) > len(nodes):
        raise PlacementError(f"STRICT_SPREAD puts each bundle on its own node: {summary}; use PACK or SPREAD")
    if strategy == "STRICT_PACK":
        if not _fits_a_node({k: v for k, v in need.items() if v > 0}, nodes):
            raise PlacementError(f"STRICT_PACK needs one node to hold the whole run: {summary}; use PACK")


def reserve(specs: Sequence[StageSpec], cfg: RayConfig) -> tuple[PlacementGroup, bool]:
    """The placement group to run in: the current one (inside a Ray Tune trial), else a new one.

    Returns (group, owned): an owned group is removed by the pipeline when it shuts down.
    """
    current = get_current_placement_group()
    if current is not None:
        if len(current.bundle_specs) < len(specs) + 1:
            raise PlacementError(
                f"this trial's placement group has {len(current.bundle_specs)} bundles, the run needs "
                f"{len(specs) + 1} (coordinator + {len(specs)} stages); declare them with hsic_ray's bundles()"
            )
        return current, False
    check_fits(specs, cfg.coordinator_cpus, cfg.strategy)
    group = placement_group(bundles(specs, cfg.coordinator_cpus), strategy=cfg.strategy, name="hsic-ray")
    ready, _ = ray.wait([group.ready()], timeout=cfg.placement_timeout_s)
    if not ready:
        ray.util.remove_placement_group(group)
        raise PlacementError(
            f"the placement group for {len(specs)} stages was not ready after {cfg.placement_timeout_s:g}s: "
            f"other work holds the resources ({ray.available_resources()} free)"
        )
    return group, True


def describe_plan(specs: Sequence[StageSpec], placements: Sequence[dict[str, Any]]) -> str:
    """A table of the plan: stage, layers, node, device."""
    lines = ["stage  layers      node              device   pid"]
    for spec, where in zip(specs, placements):
        layers = f"{spec.start}-{spec.stop - 1}" if spec.stop - spec.start > 1 else f"{spec.start}"
        lines.append(f"{spec.index:<6} {layers:<11} {where['node_ip']:<17} {where['device']:<8} {where['pid']}")
    return "\n".join(lines)


def gpu_sharing_advice(placements: Sequence[dict[str, Any]]) -> str | None:
    """What to do about stages that share a CUDA device without MPS, if any do: each is its own process, and
    the GPU time-slices between their contexts rather than running their kernels side by side."""
    sharing: dict[tuple[str, str], list[int]] = {}
    for stage, where in enumerate(placements):
        if where["device"].startswith("cuda") and not where.get("mps"):
            for gpu in where["gpu_ids"]:
                sharing.setdefault((where["node_ip"], gpu), []).append(stage)
    shared = {key: stages for key, stages in sharing.items() if len(stages) > 1}
    if not shared:
        return None
    which = "; ".join(f"stages {', '.join(map(str, s))} on GPU {gpu} of {node}" for (node, gpu), s in shared.items())
    return (
        f"stages share a GPU without NVIDIA MPS ({which}): the GPU time-slices their processes instead of "
        "running their kernels side by side, and the pipeline runs well below one process's speed; start MPS on "
        "those nodes before the job (`nvidia-cuda-mps-control -d`) or give each stage a GPU of its own "
        "(ray.gpus_per_stage=1)"
    )

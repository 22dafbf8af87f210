"""A throughput model of the Ray pipeline, checked against a `bench_pipeline.py` run, and its forecast for N devices.

    python benchmarks/pipeline_model.py benchmarks/results/h100-2026-11-27-s6/pipeline_cpu16.json
    python benchmarks/pipeline_model.py benchmarks/results/h100-2026-11-27-s6/pipeline_gpu.json --forecast 2 4 8

In steady state the pipeline moves one batch per period, the longest of:

- each stage's busy time per batch (its step and its transfers, as measured) plus the cost of one Ray call
  between actors (the measured hop, `hop_ms`, numpy path), shared by the batches of one call;
- the coordinator's serial work per batch: submitting it, and computing its kernel factors where the
  coordinator does that (in a thread that overlaps the stages, but not itself).

The check prints, per stage count, the predicted and measured samples/s and efficiency (throughput over
1 / the slowest stage's busy time, as bench_pipeline.py defines it). The forecast puts each stage on its own
device: the in-process trainer's time per batch on one device split evenly over N stages, each stage's transfer
time and the call cost as measured, and the coordinator's work as measured; and again with the factors computed
on the first stage's device (`--factors-on first_stage`), where the coordinator only submits.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass

from job_runs import markdown_table


@dataclass
class Costs:
    """Seconds per batch."""

    stage_busy: list[float]  # each stage's step and transfers
    call: float  # one actor-to-actor Ray call, shared by a call's batches
    coordinator: float  # the loop's serial work

    def period(self) -> float:
        return max(max(self.stage_busy) + self.call, self.coordinator)

    def efficiency(self) -> float:
        return max(self.stage_busy) / self.period()


def pipeline_runs(result: dict) -> list[dict]:
    """Each measured pipeline run with its stage count and where its factors were computed (older files: a
    dict by stage count, factors on the coordinator), by stage count."""
    runs = result["pipeline"]
    if isinstance(runs, dict):
        runs = [{**run, "stages": int(stages), "factors_on": "coordinator"} for stages, run in runs.items()]
    return sorted(runs, key=lambda run: (run["stages"], run["factors_on"]))


def coordinator_serial(run: dict) -> float:
    """The coordinator's serial work per batch: submitting it, and its factors where it computes them (older
    files call them targets)."""
    coordinator = run["coordinator_per_batch"]
    return coordinator["submit"] + coordinator.get("factors", coordinator.get("targets", 0.0))


def measured_costs(run: dict, hop_seconds: float) -> Costs:
    return Costs(run["stage_busy_per_batch"], hop_seconds / run["batches_per_call"], coordinator_serial(run))


def batch_size(run: dict) -> float:
    """bench_pipeline.py's batch, from its own efficiency: samples/s x slowest busy / efficiency."""
    return run["samples_per_second"] * max(run["stage_busy_per_batch"]) / run["efficiency"]


def check(result: dict) -> tuple[str, float]:
    """The model against each measured stage count; the table and the largest efficiency error."""
    hop = result["hop_ms"]["numpy"] / 1000
    rows, worst = [], 0.0
    for run in pipeline_runs(result):
        costs, batch = measured_costs(run, hop), batch_size(run)
        predicted = batch / costs.period()
        error = abs(costs.efficiency() - run["efficiency"])
        worst = max(worst, error)
        rows.append(
            [str(run["stages"]), run["factors_on"], f"{run['samples_per_second']:.0f}", f"{predicted:.0f}"]
            + [f"{run['efficiency']:.3f}", f"{costs.efficiency():.3f}", f"{error:.3f}"]
        )
    header = ["stages", "factors on", "measured samples/s", "model samples/s", "measured eff.", "model eff."]
    header.append("|difference|")
    return markdown_table(header, rows), worst


def forecast(result: dict, devices: list[int]) -> str:
    """Samples/s on N devices, each stage on its own, from the in-process trainer and the pipeline's costs."""
    in_process = max(result["in_process"].values())
    runs = pipeline_runs(result)
    transfer = max(max(r["stage_transfer_per_batch"]) for r in runs)
    rows = []
    for n in devices:
        for factors_on in ("coordinator", "first_stage"):
            # The fewest stages measured with the factors there. Without a first_stage run: the coordinator's
            # run less its factors (on the first stage's device they overlap its step).
            run = next((r for r in runs if r["factors_on"] == factors_on), None)
            if run is None and factors_on == "coordinator":
                continue
            run = run or runs[0]
            serial = coordinator_serial(run) if factors_on == "coordinator" else run["coordinator_per_batch"]["submit"]
            batch = batch_size(run)
            call = result["hop_ms"]["numpy"] / 1000 / run["batches_per_call"]
            costs = Costs([batch / in_process / n + transfer] * n, call, serial)
            samples = batch / costs.period()
            bound = "coordinator" if costs.coordinator >= max(costs.stage_busy) + costs.call else "stages"
            rows.append([str(n), factors_on, f"{samples:.0f}", f"{samples / in_process:.2f}", bound])
    header = ["devices", "factors on", "samples/s", "x in-process on one", "bound by"]
    return markdown_table(header, rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("result", help="a bench_pipeline.py --json file")
    p.add_argument("--forecast", type=int, nargs="*", default=[], metavar="N", help="devices to forecast for")
    args = p.parse_args(argv)
    with open(args.result) as f:
        result = json.load(f)
    table, worst = check(result)
    print(f"{result['device']} ({result.get('card', '?')}): the model against the measured pipeline")
    print(table, f"\nlargest efficiency difference: {worst:.3f}", sep="\n")
    if args.forecast:
        print(f"\nforecast, each stage on its own device (in-process: {max(result['in_process'].values()):.0f}/s)")
        print(forecast(result, args.forecast))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The Ray pipeline on a real local Ray cluster: equivalence, accuracy, metrics, a killed stage."""

import json
import os
import signal
import threading
import time

import psutil
import pytest
import ray
import torch

from hsic_ray.config import build_config
from hsic_ray.data import iterate_batches
from hsic_ray.distributed.batches_per_call import GROUPS_BEFORE_CHOOSING, choose_batches_per_call
from hsic_ray.distributed.placement import plan_stages
from hsic_ray.distributed.ray_pipeline import RayPipeline
from hsic_ray.distributed.shutdown import shutdown
from hsic_ray.experiment import build_seeded_network, run_hsic
from hsic_ray.models import layer_step_costs
from hsic_ray.objective import HSICObjective
from hsic_ray.trainer import with_factors

# One Ray cluster for the module (its fixture): its tests run on one pytest-xdist worker.
pytestmark = pytest.mark.xdist_group("ray_pipeline")


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(address="local", num_cpus=5, num_gpus=0, include_dashboard=False)
    yield
    shutdown()


def config(out, trainer, **extra):
    overrides = {
        "trainer": trainer,
        "output": str(out),
        "model.depth": 2,
        "model.width": 64,
        "train.batch_size": 128,
        "train.epochs": 1,
        "head.epochs": 2,
        "train.eval_samples": 256,
        "train.log_every": 5,
        "train.monitor_every": 1,  # the monitors before training read the stages too
        "ray.stages": 2,
    }
    return build_config("paper_mlp", overrides={**overrides, **extra})


def records(out, kind):
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def run_local_and_ray(tmp_path, digits, make_config, grouping):
    """The same run in process (under tmp_path/local) and on the Ray pipeline with `grouping` (tmp_path/ray).

    The in-process run has the stage actors' one torch thread: BLAS rounds differently with another thread
    count, and the float32 differences (1e-5 at the first step) grow over training."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        training = {key: value for key, value in grouping.items() if not key.startswith("ray.")}
        local = run_hsic(make_config(tmp_path / "local", "local", **training), digits)
    finally:
        torch.set_num_threads(threads)
    return local, run_hsic(make_config(tmp_path / "ray", "ray", **grouping), digits)


def assert_same_training(tmp_path, local, piped, rel=1e-4):
    """The two runs of `run_local_and_ray` trained alike: the same steps, every logged loss within `rel`,
    each layer's final nHSIC within 10 x `rel`, unformatted accuracy within half a point."""
    assert local["steps"] == piped["steps"] == 15
    for a, b in zip(local["per_layer"], piped["per_layer"]):
        assert b["nhsic_zx"] == pytest.approx(a["nhsic_zx"], rel=10 * rel)
        assert b["nhsic_zy"] == pytest.approx(a["nhsic_zy"], rel=10 * rel)
    local_steps, ray_steps = records(tmp_path / "local", "step"), records(tmp_path / "ray", "step")
    assert [r["step"] for r in local_steps] == [r["step"] for r in ray_steps]
    for a, b in zip(local_steps, ray_steps):
        assert b["loss"] == pytest.approx(a["loss"], rel=rel)
    assert piped["test_accuracy_unformatted"] == pytest.approx(local["test_accuracy_unformatted"], abs=0.5)


@pytest.mark.parametrize(
    "grouping",
    [
        {"ray.max_in_flight": 1, "ray.batches_per_call": 1},  # one batch at a time through the stages
        {"ray.max_in_flight": 3, "ray.batches_per_call": 3},  # one group of three at a time
        # Groups of two, 2 x 2 x 2 batches in flight; the coordinator computes factors three batches at a time
        # (train.factor_group; the in-process run groups them too), across calls.
        {"ray.batches_per_call": 2, "train.factor_group": 3},
        # Factors computed by the first stage (the default with GPU stages) rather than the coordinator: one
        # batch per call; within each call of three, a group of two and then one.
        {"ray.max_in_flight": 1, "ray.batches_per_call": 1, "ray.factors_on": "first_stage"},
        {"ray.batches_per_call": 3, "ray.factors_on": "first_stage", "train.factor_group": 2},
        {"ray.stages": 1, "ray.batches_per_call": 2, "ray.factors_on": "first_stage"},  # first and last: 3 returns
        # The objective's extensions (the leave-one-out fit among them): each stage weighs its layers by their
        # place in the whole network; and each stage follows the learning-rate schedule from its own step count.
        {
            "ray.max_in_flight": 1,
            "ray.batches_per_call": 1,
            "hsic.input_weight_first": -50.0,
            "hsic.layer_sigma": 3.0,
            "hsic.lr_scale_last": 0.1,
            "optim.schedule": "cosine",
            "hsic.leave_one_out": True,
        },
    ],
)
def test_the_pipeline_reproduces_the_in_process_trainer(tmp_path, digits, grouping):
    local, piped = run_local_and_ray(tmp_path, digits, config, grouping)
    assert piped["stages"] == grouping.get("ray.stages", 2)
    assert_same_training(tmp_path, local, piped)
    # Every layer's linear probe, read through the stage actors' layer_outputs, before and after the epoch
    # and on the full splits: the same figures (a sample or two may flip with the last bits of the weights).
    local_probes, ray_probes = records(tmp_path / "local", "probes"), records(tmp_path / "ray", "probes")
    assert [r["epoch"] for r in local_probes] == [r["epoch"] for r in ray_probes] == [0, 1]
    for a, b in zip([*local_probes, local["probes"]], [*ray_probes, piped["probes"]]):
        assert len(b["test_accuracy"]) == 4
        assert b["train_accuracy"] == pytest.approx(a["train_accuracy"], abs=0.1)
        assert b["test_accuracy"] == pytest.approx(a["test_accuracy"], abs=0.2)


def test_pipeline_metrics_report_stage_times_and_in_flight_depth(tmp_path, digits):
    metrics = run_hsic(config(tmp_path / "run", "ray", **{"ray.stages": 3}), digits)
    assert metrics["stages"] == 3 and metrics["recoveries"] == 0
    assert len(metrics["stage_busy_seconds"]) == 3 and all(t > 0 for t in metrics["stage_busy_seconds"])
    assert len(metrics["stage_idle_seconds"]) == 3
    steps = records(tmp_path / "run", "step")
    # While the first groups are timed, one batch per call and 2 x stages in flight: the first log step
    # (batch 5, finished once 10 were submitted) sees the window full.
    assert steps[0]["step"] == 5 and steps[0]["in_flight"] == 2 * 3
    # Then the batches per call chosen, once, and the in-flight bound it sets, which the loop kept to.
    [chosen] = records(tmp_path / "run", "batches_per_call")
    assert chosen["step_ms"] > 0 and chosen["call_overhead_ms"] >= 0
    assert chosen["max_in_flight"] == 2 * 3 * chosen["batches_per_call"]
    assert all(r["in_flight"] <= chosen["max_in_flight"] for r in steps)
    assert all(len(r["stage_busy_seconds"]) == 3 for r in steps)


def test_the_pipeline_settles_its_batches_per_call_after_timing_the_first_groups(tmp_path, digits):
    cfg = config(tmp_path, "ray")
    net = build_seeded_network(cfg, digits)
    objective = HSICObjective(cfg.hsic, digits.num_classes)
    specs = plan_stages(cfg.ray, layer_step_costs(net, cfg.train.batch_size), {"CPU": 3.0, "GPU": 0.0})
    paces = []  # the step times the pipeline asks its drain interval for

    def drain_every(seconds_per_batch):
        paces.append(seconds_per_batch)
        return 3

    pipeline = RayPipeline(cfg, specs, digits.input_shape, digits.num_classes, drain_every=drain_every)
    try:
        assert not pipeline.settled and (pipeline.batches_per_call, pipeline.max_in_flight) == (1, 4)
        batches = iterate_batches(digits.x_train, digits.y_train, cfg.train.batch_size, seed=0, epoch=1)
        for _, batch in zip(range(GROUPS_BEFORE_CHOOSING), batches):
            assert not pipeline.settled
            pipeline.result(pipeline.submit(batch, objective.kernel_factors(batch.x, batch.y)), want_output=False)
        assert pipeline.settled  # chosen from the steps timed: final for the rest of the run
        assert pipeline.max_in_flight == 2 * 2 * pipeline.batches_per_call
        # What the choice was made from, reported once for metrics.jsonl: the choice follows from it.
        [chosen] = pipeline.events()
        busy, overhead = chosen["step_ms"] / 1e3, chosen["call_overhead_ms"] / 1e3
        assert paces == [pytest.approx(busy)]
        assert chosen["batches_per_call"] == pipeline.batches_per_call == choose_batches_per_call(busy, overhead, 2, 3)
        assert pipeline.events() == []
    finally:
        pipeline.shutdown()
    cfg.ray.batches_per_call = 3
    pipeline = RayPipeline(cfg, specs, digits.input_shape, digits.num_classes)
    try:
        assert pipeline.settled and (pipeline.batches_per_call, pipeline.max_in_flight) == (3, 12)
    finally:
        pipeline.shutdown()


@pytest.mark.parametrize("factors_on", ["coordinator", "first_stage"])
def test_a_stage_reports_the_part_of_its_time_spent_computing_factors(tmp_path, digits, factors_on):
    # What tells the first stage's extra work apart from its layers' (benchmarks/bench_pipeline.py prints it).
    cfg = config(tmp_path, "ray", **{"ray.factors_on": factors_on, "ray.batches_per_call": 2})
    net = build_seeded_network(cfg, digits)
    specs = plan_stages(cfg.ray, layer_step_costs(net, cfg.train.batch_size), {"CPU": 3.0, "GPU": 0.0})
    pipeline = RayPipeline(cfg, specs, digits.input_shape, digits.num_classes)
    try:
        batches = iterate_batches(digits.x_train, digits.y_train, cfg.train.batch_size, seed=0, epoch=1)
        items = with_factors(batches, HSICObjective(cfg.hsic, digits.num_classes).group_kernel_factors, pipeline)
        handles = [pipeline.submit(*item) for _, item in zip(range(4), items)]
        results = [pipeline.result(handle, want_output=False) for handle in handles]
        getattr(items, "close", lambda: None)()  # the coordinator's prefetching thread
    finally:
        pipeline.shutdown()
    for result in results:
        (first_busy, _), _ = result.stage_seconds
        first, second = result.stage_factor_seconds
        assert second == 0.0
        assert (0.0 < first < first_busy) if factors_on == "first_stage" else first == 0.0


@pytest.mark.slow
def test_default_in_flight_depth_stays_within_a_point_of_the_in_process_trainer(tmp_path, all_digits):
    common = {
        "train.epochs": 3,
        "model.width": 256,
        "train.batch_size": 256,
        "head.epochs": 3,
        "train.probe_samples": 0,  # the accuracies are compared, not the monitors
    }
    local = run_hsic(config(tmp_path / "local", "local", **common), all_digits)
    piped = run_hsic(config(tmp_path / "ray", "ray", **common), all_digits)
    assert abs(piped["test_accuracy_unformatted"] - local["test_accuracy_unformatted"]) <= 1.0
    assert abs(piped["test_accuracy_formatted"] - local["test_accuracy_formatted"]) <= 1.0


def stage_actor_processes():
    return [p for p in psutil.process_iter(["cmdline"]) if "ray::StageActor" in " ".join(p.info["cmdline"] or [])]


def kill_a_stage_after_checkpoint(run_dir, killed, stage):
    deadline = time.time() + 120
    while time.time() < deadline and not (run_dir / "checkpoints" / "LATEST").exists():
        time.sleep(0.05)
    placements = json.loads((run_dir / "placements.json").read_text())
    victims = [p for p in stage_actor_processes() if p.pid == placements[stage]["pid"]]
    if victims:
        os.kill(victims[0].pid, signal.SIGKILL)
        killed.append(victims[0].pid)


@pytest.mark.slow
@pytest.mark.parametrize(
    "factors_on, stage",
    [
        ("coordinator", 1),
        ("first_stage", 0),  # the stage that computes every stage's factors: they are computed again
    ],
)
def test_a_stage_killed_with_sigkill_is_recreated_and_the_run_completes(tmp_path, all_digits, factors_on, stage):
    common = {
        "train.epochs": 2,
        "model.width": 256,
        "train.batch_size": 256,
        "head.epochs": 3,
        "train.checkpoint_every": 20,
        "train.checkpoint_seconds": 0,
        "ray.factors_on": factors_on,
        "train.probe_samples": 0,  # monitors are not what this test is about
        "train.bn_calibration_batches": 0,
    }
    undisturbed = run_hsic(config(tmp_path / "calm", "ray", **common), all_digits)
    killed: list[int] = []
    killer = threading.Thread(target=kill_a_stage_after_checkpoint, args=(tmp_path / "hit", killed, stage))
    killer.start()
    disturbed = run_hsic(config(tmp_path / "hit", "ray", **common), all_digits)
    killer.join()
    assert killed, "no stage actor process was found to kill"
    assert disturbed["recoveries"] >= 1 and disturbed["steps"] == undisturbed["steps"]
    recovery = records(tmp_path / "hit", "recovery")[0]
    assert recovery["stage"] == stage and recovery["restored_from_step"] == 20 and recovery["error"].endswith("Error")
    assert abs(disturbed["test_accuracy_unformatted"] - undisturbed["test_accuracy_unformatted"]) <= 2.0


def kill_and_await_death(actor):
    """`ray.kill` only asks for the kill: a call made just after it can still be served. Returns once the
    actor is gone, so the next request is sure to find it dead."""
    ray.kill(actor, no_restart=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            ray.get(actor.where.remote(), timeout=5)
        except ray.exceptions.RayActorError:
            return
        time.sleep(0.05)
    raise AssertionError("a killed stage actor still answers after 30 s")


def test_a_stage_lost_outside_training_is_recovered_by_evaluation_and_checkpoints(tmp_path, digits):
    # A stage can die while the coordinator evaluates or checkpoints (a node lost at the end of an epoch):
    # those requests recover it from the checkpoint and run again, as training steps do.
    from hsic_ray.distributed.placement import cluster_totals, plan_stages
    from hsic_ray.distributed.ray_pipeline import RayPipeline
    from hsic_ray.models import build_network, layer_step_costs
    from hsic_ray.run.directory import RunDirectory

    cfg = config(tmp_path / "run", "ray")
    net = build_network(cfg.model, digits.input_shape)
    specs = plan_stages(cfg.ray, layer_step_costs(net, cfg.train.batch_size), cluster_totals())
    pipeline = RayPipeline(cfg, specs, digits.input_shape, digits.num_classes)
    try:
        run = RunDirectory(str(tmp_path / "run"))
        pipeline.save(run, 0)
        x = torch.rand(64, *digits.input_shape)
        before = pipeline.forward(x)
        kill_and_await_death(pipeline.stages.actors[1])
        assert torch.equal(pipeline.forward(x), before)  # stage 1 recreated from the checkpoint
        kill_and_await_death(pipeline.stages.actors[1])  # and again, under a pass of overlapped chunks
        assert all(torch.equal(out, before) for out in pipeline.forward_chunks([x] * 4))
        kill_and_await_death(pipeline.stages.actors[0])
        pipeline.save(run, 1)
        assert [(e["kind"], e["stage"], e["restored_from_step"]) for e in pipeline.events()] == [
            ("recovery", 1, 0),
            ("recovery", 1, 0),
            ("recovery", 0, 0),
        ]
        assert len(list((tmp_path / "run" / "checkpoints").rglob("*"))) > 0
        assert torch.equal(pipeline.forward(x), before)
    finally:
        pipeline.shutdown()

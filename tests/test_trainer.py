"""The in-process trainer end to end on the real bundled digits (small nets, few steps)."""

import itertools
import json

import numpy as np
import pytest
import torch

from hsic_ray.config import TrainConfig, build_config
from hsic_ray.data import iterate_batches
from hsic_ray.experiment import build_seeded_network, run_backprop, run_hsic
from hsic_ray.head import FormatHead
from hsic_ray.local_pipeline import LocalPipeline
from hsic_ray.monitor_schedule import MonitorSchedule
from hsic_ray.objective import HSICObjective
from hsic_ray.run.claim import OutputExistsError
from hsic_ray.schedule import LRSchedule
from hsic_ray.trainer import HSICTrainer, batches_between_drains, batchnorm_calibration_batches, with_factors
from hsic_ray.training_state import Progress


def small_config(tmp_path, **extra):
    overrides = {
        "model.depth": 2,
        "model.width": 64,
        "train.batch_size": 128,
        "train.epochs": 2,
        "head.epochs": 3,
        "train.eval_samples": 256,
        "train.log_every": 5,
        "train.monitor_every": 1,  # a record per epoch, from epoch 0: what most tests here read
        "output": str(tmp_path / "run"),
        "trainer": "local",
    }
    overrides.update(extra)
    return build_config("paper_mlp", overrides=overrides)


def test_run_writes_metrics_config_and_plot(tmp_path, digits):
    metrics = run_hsic(small_config(tmp_path), digits)
    run = tmp_path / "run"
    saved = json.loads((run / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics))
    for key in ("test_accuracy_unformatted", "test_accuracy_formatted", "train_seconds", "steps", "samples_per_second"):
        assert key in saved
    assert 0 <= saved["test_accuracy_formatted"] <= 100 and 0 <= saved["test_accuracy_unformatted"] <= 100
    assert saved["test_accuracy_unformatted"] > 40  # well above the 10% of chance after 30 steps
    assert saved["steps"] == 2 * (2000 // 128)
    assert len(saved["per_layer"]) == 4 and all(set(p) == {"nhsic_zx", "nhsic_zy"} for p in saved["per_layer"])
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    kinds = [r["kind"] for r in lines]
    assert kinds.count("epoch") == 3 and kinds.count("format_epoch") == 3 and "step" in kinds
    assert (run / "information_plane.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "depth: 2" in (run / "config.yaml").read_text()


def test_a_run_says_where_its_wall_time_went(tmp_path, digits):
    phases = run_hsic(small_config(tmp_path), digits)["phase_seconds"]
    for phase in ("before_run", "data", "actors", "train", "calibration", "information_plane", "probes"):
        assert phases[phase] > 0, phase
    for phase in ("final_evaluation", "head", "final_probes", "writing", "plots"):
        assert phases[phase] > 0, phase
    # A phase inside another counts once (writing metrics.jsonl during training is not training): the phases
    # add up to the process's age, less the few lines no phase covers.
    covered = sum(seconds for phase, seconds in phases.items() if phase != "total")
    assert phases["total"] - 1.0 < covered <= phases["total"]


def test_monitors_every_few_epochs_record_what_every_epoch_would(tmp_path, digits):
    every = run_hsic(small_config(tmp_path / "every", **{"train.epochs": 3}), digits)
    sparse = run_hsic(small_config(tmp_path / "sparse", **{"train.epochs": 3, "train.monitor_every": 2}), digits)
    for kind in ("epoch", "probes"):
        by_epoch = {r["epoch"]: r for r in records(tmp_path / "every" / "run", kind)}
        kept = records(tmp_path / "sparse" / "run", kind)
        assert [r["epoch"] for r in kept] == [0, 2, 3]  # and always the last
        for record in kept:
            compared = {key: value for key, value in record.items() if key != "seconds"}
            assert compared == {key: by_epoch[record["epoch"]][key] for key in compared}
    assert sparse["test_accuracy_formatted"] == every["test_accuracy_formatted"]
    assert sparse["per_layer"] == every["per_layer"]


def test_monitors_by_time_share_skip_epoch_zero_keep_the_last_and_record_what_every_epoch_would(tmp_path, digits):
    every = run_hsic(small_config(tmp_path / "every", **{"train.epochs": 4}), digits)
    # A share no round fits in: the first epoch's round runs (its cost is not known before), then only the last.
    auto = {"train.epochs": 4, "train.monitor_every": None, "train.monitor_share": 1e-6}
    by_share = run_hsic(small_config(tmp_path / "share", **auto), digits)
    for kind in ("epoch", "probes"):
        by_epoch = {r["epoch"]: r for r in records(tmp_path / "every" / "run", kind)}
        kept = records(tmp_path / "share" / "run", kind)
        assert [r["epoch"] for r in kept] == [1, 4]
        for record in kept:
            compared = {key: value for key, value in record.items() if key != "seconds"}
            assert compared == {key: by_epoch[record["epoch"]][key] for key in compared}
    assert by_share["test_accuracy_formatted"] == every["test_accuracy_formatted"]


def test_a_reporting_run_reads_the_plane_every_epoch_and_probes_on_the_schedule(tmp_path, digits):
    reports = []
    auto = {"train.epochs": 3, "train.monitor_every": None, "train.monitor_share": 1e-6}
    run_hsic(small_config(tmp_path, **auto), digits, on_epoch=reports.append)
    assert [r["epoch"] for r in reports] == [1, 2, 3]  # what a sweep's trial reports, every epoch
    assert [r["epoch"] for r in records(tmp_path / "run", "epoch")] == [1, 2, 3]
    assert [r["epoch"] for r in records(tmp_path / "run", "probes")] == [1, 3]


@pytest.mark.parametrize(
    "every, share, rounds, expected",
    [
        # Every Nth epoch from epoch 0, and the last (epoch 5).
        (2, 0.1, [], [0, 2, 4, 5]),
        # By share, 10 s of training per epoch: rounds of 1 s fit in 10% after every epoch. Rounds of 2 s: the
        # first after epoch 1 (its cost unknown before), the next once 4 s fit in 10% (40 s, epoch 4); the last
        # always. None before training.
        (None, 0.1, [1.0] * 6, [1, 2, 3, 4, 5]),
        (None, 0.1, [2.0] * 6, [1, 4, 5]),
    ],
)
def test_monitor_schedule(every, share, rounds, expected):
    schedule = MonitorSchedule(TrainConfig(epochs=5, monitor_every=every, monitor_share=share))
    due = []
    for epoch in range(6):
        if schedule.due(epoch, last=epoch == 5, train_seconds=10.0 * epoch):
            due.append(epoch)
            schedule.ran(rounds[epoch] if rounds else 0.0)
    assert due == expected


@pytest.mark.parametrize("plot_seconds, drawn_after_epoch_1", [(1e-9, True), (60, False)])
def test_plots_are_redrawn_during_training_only_once_plot_seconds_have_passed(
    tmp_path, digits, plot_seconds, drawn_after_epoch_1
):
    plot = tmp_path / "run" / "information_plane.png"
    seen = []
    cfg = small_config(tmp_path, **{"train.plot_seconds": plot_seconds, "train.epochs": 1})
    run_hsic(cfg, digits, on_epoch=lambda record: seen.append(plot.exists()))
    assert seen == [drawn_after_epoch_1]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # the end of the run always draws


def records(run, kind):
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if r["kind"] == kind]


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")),
    ],
)
def test_the_loop_computes_factors_where_the_in_process_step_runs(digits, device):
    cfg = build_config("paper_mlp", overrides={"model.depth": 1, "model.width": 32})
    objective = HSICObjective(cfg.hsic, 10)
    pipeline = LocalPipeline(build_seeded_network(cfg, digits), objective, cfg.optim, device)
    batches = list(iterate_batches(digits.x_train, digits.y_train, 128, seed=1, epoch=1))[:3]
    items = list(with_factors(batches, objective.group_kernel_factors, pipeline))
    assert [batch.index for batch, _ in items] == [0, 1, 2]
    for (batch, factors), original in zip(items, batches):
        assert batch.x.device.type == batch.y.device.type == factors.y_factor.device.type == device
        assert torch.equal(batch.x.cpu(), original.x) and torch.equal(batch.y.cpu(), original.y)
        # The factors are ill-conditioned (cca's ridge is about as large as the kernel's eigenvalues), so two
        # float32 backends disagree in low bits: each is held to a float64 reference instead, the step's
        # device no further from it than the host (ten times the host's error, with a float32 floor).
        host = objective.kernel_factors(original.x, original.y)
        exact = objective.kernel_factors(original.x.double(), original.y)
        for name in ("x_factor", "y_factor"):
            reference = getattr(exact, name)
            error_here = (getattr(factors, name).cpu().double() - reference).abs().max().item()
            error_host = (getattr(host, name).double() - reference).abs().max().item()
            assert error_here <= 10 * error_host + 1e-6, (
                f"{name}: {error_here:.3g} from float64 on {device}, host {error_host:.3g}"
            )
        # On a GPU the factors' solve status stays there for the stage to check (no host read in the loop).
        assert (factors.failed is not None and not bool(factors.failed)) if device == "cuda" else factors.failed is None
        pipeline.submit(batch, factors)  # the step takes the batch where the loop left it


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="host syncs are a GPU's cost (the loop's logic is tested on CPU)"
)
@pytest.mark.parametrize("group", [1, 4])
def test_the_in_process_loop_on_a_gpu_never_waits_for_the_device_between_log_steps(digits, group):
    # A host read in the loop (a solve's status, a pageable copy) makes each step wait for the one before:
    # torch's sync debug mode raises on any of them. `group`: batches whose factors are computed together.
    cfg = build_config("paper_mlp", overrides={"model.depth": 1, "model.width": 32})
    objective = HSICObjective(cfg.hsic, 10)
    pipeline = LocalPipeline(
        build_seeded_network(cfg, digits), objective, cfg.optim, "cuda", schedule=LRSchedule("cosine", 100)
    )  # each step writes its factor to the device
    batches = iterate_batches(digits.x_train, digits.y_train, 128, seed=1, epoch=1)
    items = with_factors(batches, objective.group_kernel_factors, pipeline, group)
    for batch, factors in itertools.islice(items, 3):  # the first step captures the graph
        pipeline.result(pipeline.submit(batch, factors), want_output=False, read_back=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for batch, factors in itertools.islice(items, 8):
            pipeline.result(pipeline.submit(batch, factors), want_output=False, read_back=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    result = pipeline.result(pipeline.submit(*next(items)), want_output=False, read_back=True)
    assert torch.isfinite(result.layer_stats).all() and pipeline.stage.steps == 12


def test_factors_computed_ahead_in_a_thread_arrive_in_order_and_unchanged(digits):
    cfg = build_config("paper_mlp", overrides={"model.depth": 1, "model.width": 32})
    objective = HSICObjective(cfg.hsic, 10)
    pipeline = LocalPipeline(build_seeded_network(cfg, digits), objective, cfg.optim, "cpu")
    batches = list(iterate_batches(digits.x_train, digits.y_train, 128, seed=1, epoch=1))[:4]
    inline = list(with_factors(batches, objective.group_kernel_factors, pipeline))
    pipeline.prefetch_factors, pipeline.max_in_flight = True, 2  # as the Ray pipeline's coordinator does
    ahead = list(with_factors(batches, objective.group_kernel_factors, pipeline))
    assert [b.index for b, _ in ahead] == [b.index for b, _ in inline] == [0, 1, 2, 3]
    for (_, a), (_, b) in zip(ahead, inline):
        assert torch.equal(a.x_factor, b.x_factor) and torch.equal(a.y_factor, b.y_factor)


@pytest.mark.parametrize("prefetch", [False, True])
def test_factors_computed_a_group_at_a_time_are_each_batchs_in_order(digits, prefetch):
    # train.factor_group: seven batches in groups of three (the last alone), inline and from the thread.
    cfg = build_config("paper_mlp", overrides={"model.depth": 1, "model.width": 32})
    objective = HSICObjective(cfg.hsic, 10)
    pipeline = LocalPipeline(build_seeded_network(cfg, digits), objective, cfg.optim, "cpu")
    pipeline.prefetch_factors, pipeline.max_in_flight = prefetch, 4
    batches = list(iterate_batches(digits.x_train, digits.y_train, 64, seed=1, epoch=1))[:7]
    one_by_one = list(with_factors(batches, objective.group_kernel_factors, pipeline))
    grouped = list(with_factors(batches, objective.group_kernel_factors, pipeline, group=3))
    assert [b.index for b, _ in grouped] == [b.index for b, _ in one_by_one] == list(range(7))
    for (batch, factors), (alone, expected) in zip(grouped, one_by_one):
        assert torch.equal(batch.x, alone.x) and torch.equal(batch.y, alone.y)
        torch.testing.assert_close(factors.x_factor, expected.x_factor, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(factors.y_factor, expected.y_factor, rtol=1e-5, atol=1e-7)


def test_a_run_with_grouped_factors_trains_as_one_with_factors_batch_by_batch(tmp_path, digits):
    settings = {"train.epochs": 1, "head.epochs": 1}
    alone = run_hsic(small_config(tmp_path / "alone", **settings, **{"train.factor_group": 1}), digits)
    grouped = run_hsic(small_config(tmp_path / "grouped", **settings, **{"train.factor_group": 4}), digits)
    assert grouped["steps"] == alone["steps"]
    for a, b in zip(alone["per_layer"], grouped["per_layer"]):
        assert a.keys() == b.keys()
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key


def test_same_seed_same_run_on_cpu(tmp_path, digits):
    a = run_hsic(small_config(tmp_path / "a", **{"train.epochs": 1}), digits)
    b = run_hsic(small_config(tmp_path / "b", **{"train.epochs": 1}), digits)
    c = run_hsic(small_config(tmp_path / "c", **{"train.epochs": 1, "train.seed": 7}), digits)
    assert a["per_layer"] == b["per_layer"] and a["test_accuracy_formatted"] == b["test_accuracy_formatted"]
    assert a["per_layer"] != c["per_layer"]


def test_max_steps_stops_hsic_training(tmp_path, digits):
    metrics = run_hsic(small_config(tmp_path, **{"train.max_steps": 4, "train.epochs": 5}), digits)
    assert metrics["steps"] == 4 and metrics["epochs"] == 1


def test_concurrent_head_never_changes_the_hsic_layers(tmp_path, digits):
    def trained_layers(concurrent):
        cfg = small_config(
            tmp_path / str(concurrent), **{"head.concurrent": concurrent, "train.epochs": 1, "head.epochs": 0}
        )
        net = build_seeded_network(cfg, digits)
        pipeline = LocalPipeline(net, HSICObjective(cfg.hsic, 10), cfg.optim, "cpu")
        trainer = HSICTrainer(cfg, digits, pipeline, net.output_features)
        trainer.fit()
        return trainer, [p.detach().clone() for p in net.parameters()]

    with_head, weights_with = trained_layers(True)
    _, weights_without = trained_layers(False)
    assert all(torch.equal(a, b) for a, b in zip(weights_with, weights_without))
    # ...while the concurrent head did train.
    fresh = FormatHead(10, 10, with_head.cfg.head)
    assert not torch.equal(fresh.head[1].weight, with_head.head.head[1].weight)


def test_head_gradient_never_reaches_the_network(digits):
    cfg = build_config("paper_mlp", overrides={"model.depth": 1, "model.width": 16})
    net = build_seeded_network(cfg, digits)
    head = FormatHead(net.output_features, 10, cfg.head)
    x = torch.from_numpy(digits.x_train[:64]).float() / 255
    head.step(net(x), torch.from_numpy(digits.y_train[:64]))
    assert all(p.grad is None for p in net.parameters())


def test_refuses_to_overwrite_a_finished_run(tmp_path, digits):
    cfg = small_config(tmp_path, **{"train.max_steps": 1, "head.epochs": 1})
    run_hsic(cfg, digits)
    before = (tmp_path / "run" / "metrics.json").read_bytes()
    with pytest.raises(OutputExistsError, match="already holds a finished run"):
        run_hsic(cfg, digits)
    assert (tmp_path / "run" / "metrics.json").read_bytes() == before


def test_batch_larger_than_the_data_is_refused_before_training(tmp_path, digits):
    cfg = small_config(tmp_path, **{"train.batch_size": 5000})
    with pytest.raises(ValueError, match="batch_size=5000 exceeds"):
        run_hsic(cfg, digits)
    assert not (tmp_path / "run").exists()


def test_narrow_last_layer_reports_no_unformatted_accuracy(tmp_path, digits):
    metrics = run_hsic(small_config(tmp_path, **{"model.last_width": 4, "train.max_steps": 3}), digits)
    assert metrics["test_accuracy_unformatted"] is None and metrics["test_accuracy_unformatted_greedy"] is None
    assert 0 <= metrics["test_accuracy_formatted"] <= 100


def test_backprop_baseline_learns_and_logs_gradient_norms(tmp_path, digits):
    cfg = small_config(tmp_path, **{"backprop.lr": 0.05})
    metrics = run_backprop(cfg, digits)
    assert metrics["test_accuracy_formatted"] > 70
    assert metrics["test_accuracy_unformatted"] is None
    assert len(metrics["grad_norms"]) == 4 and all(g > 0 for g in metrics["grad_norms"])
    assert np.isfinite(metrics["train_seconds"]) and metrics["steps"] == 2 * (2000 // 128)


def checkpoint_steps(run):
    records = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    return [r["step"] for r in records if r["kind"] == "checkpoint"]


@pytest.mark.parametrize(
    "every, seconds, expected",
    [
        # Each step comes more than that after the last checkpoint. The end of HSIC training writes one more,
        # holding what the epoch's end changed (BatchNorm statistics).
        (0, 1e-9, [1, 2, 3, 4, 5, 6, 7, 7]),
        (3, 0, [3, 6, 7]),
        (0, 3600, [7]),
    ],
)
def test_checkpoints_come_by_time_since_the_last_and_by_steps(tmp_path, digits, every, seconds, expected):
    cfg = small_config(
        tmp_path,
        **{
            "train.max_steps": 7,
            "head.epochs": 1,
            "train.probe_samples": 0,
            "train.checkpoint_every": every,
            "train.checkpoint_seconds": seconds,
        },
    )
    metrics = run_hsic(cfg, digits)
    assert checkpoint_steps(tmp_path / "run") == expected
    assert metrics["checkpoint_write_seconds"] > 0  # kept apart from train_seconds


@pytest.mark.parametrize(
    "every, seconds, seconds_per_batch, expected",
    [
        (0, 0, 0.1, 31),  # only the epoch's end
        (10, 0, 0.1, 10),
        (0, 60, 0.1, 31),  # 600 batches a checkpoint: the epoch ends first
        (0, 60, 5.0, 12),
        (10, 0.5, 0.1, 5),
        (0, 1e-6, 0.1, 1),
    ],
)
def test_the_loop_drains_at_each_epoch_end_and_checkpoint(every, seconds, seconds_per_batch, expected):
    # 8,000 samples in batches of 256: 31 full batches an epoch (the short one is dropped).
    train = TrainConfig(batch_size=256, checkpoint_every=every, checkpoint_seconds=seconds)
    assert batches_between_drains(train, 8000, seconds_per_batch) == expected


def test_batchnorm_calibration_batches_are_fixed_by_the_seed_and_sized_by_the_config(digits):
    train = TrainConfig(batch_size=128, bn_calibration_batches=3, seed=5)
    batches = batchnorm_calibration_batches(digits.x_train, train)
    assert [len(b) for b in batches] == [128, 128, 128]
    again = batchnorm_calibration_batches(digits.x_train, train)
    assert all(torch.equal(a, b) for a, b in zip(batches, again))
    other = batchnorm_calibration_batches(digits.x_train, TrainConfig(batch_size=128, bn_calibration_batches=3))
    assert not torch.equal(batches[0], other[0])
    # More batches than the split holds: every sample once.
    whole = batchnorm_calibration_batches(digits.x_train[:300], TrainConfig(batch_size=128, bn_calibration_batches=9))
    assert sum(len(b) for b in whole) == 300


def test_progress_counts_on_from_its_state_and_reports_stage_time_only_for_several_stages():
    progress = Progress.of_stages(2)
    progress.steps, progress.train_seconds, progress.recoveries = 10, 2.0, 1
    progress.add_stage_seconds([(1.0, 0.5), (2.0, 0.25)])
    progress.add_stage_seconds([(1.0, 0.5), (2.0, 0.25)])
    resumed = Progress.of_stages(2)
    resumed.load_state_dict(progress.state_dict())
    assert resumed == progress
    summary = resumed.summary(batch_size=64)
    assert summary["samples_per_second"] == 10 * 64 / 2.0 and summary["stages"] == 2
    assert summary["stage_busy_seconds"] == [2.0, 4.0] and summary["stage_idle_seconds"] == [1.0, 0.5]
    assert "stage_busy_seconds" not in Progress.of_stages(1).summary(batch_size=64)

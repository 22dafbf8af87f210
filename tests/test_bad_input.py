"""Bad input to the job scripts: one line naming the problem and the fix, a non-zero exit, nothing written,
no Ray started for what can be checked without it, and nothing already written lost or mixed."""

import dataclasses
import json
import os
import random
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import ray

from hsic_ray import config as config_module
from hsic_ray.cli import USER_ERRORS
from hsic_ray.config import ExperimentConfig
from hsic_ray.distributed import connect as connect_module
from hsic_ray.distributed.connect import ClusterConnectionError, check_address
from hsic_ray.distributed.shutdown import shutdown
from hsic_ray.run.claim import OutputExistsError, claim
from hsic_ray.run.directory import OutputLocationError, check_location

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "jobs"))
import sweep_depth  # noqa: E402
import train_backprop  # noqa: E402
import train_deep  # noqa: E402

NET = ["--depth", "1", "--width", "16", "--max-steps", "2", "--epochs", "1", "train.eval_samples=64"]
TINY = ["--trainer", "local", "--format-epochs", "1", *NET]


def tree(root: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()} if root.exists() else {}


def refused(main, argv, capsys, *, code=2) -> str:
    """Run a job's main in process; it must exit `code` with exactly one line on stderr, which is returned."""
    assert main(argv) == code
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run in an empty directory, so that a default output (runs/...) would show up in it."""
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    assert not (tmp_path / "runs").exists(), "a failed job left a run directory behind"
    assert not ray.is_initialized(), "a job that failed its checks started Ray"


# --- where a run writes -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "where, message",
    [
        ("a-file", "is a file"),
        ("a-file/run", "is under .*a-file, which is a file"),
        ("/proc/1/run", "on a proc filesystem .*cannot hold a run"),
        ("nosuchscheme://bucket/run", "cannot be used .*Unrecognized filesystem"),
        ("", "output=.. is invalid: expected a directory path or URI"),
    ],
)
def test_output_that_cannot_hold_a_run_is_one_line(in_tmp, capsys, where, message):
    (in_tmp / "a-file").write_text("mine")
    line = refused(train_deep.main, [*TINY, "--output", where], capsys)
    assert re.search(message, line), line
    assert (in_tmp / "a-file").read_text() == "mine"


def test_a_directory_of_someone_elses_files_is_never_written_into(in_tmp, capsys):
    mine = in_tmp / "mine"
    mine.mkdir()
    (mine / "config.yaml").write_text("my own notes\n")
    line = refused(train_deep.main, [*TINY, "--output", str(mine)], capsys)
    assert "not an hsic-ray run (config.yaml)" in line
    assert tree(mine) == {mine / "config.yaml": b"my own notes\n"}


def test_a_run_of_another_kind_is_refused(in_tmp, capsys):
    out = in_tmp / "run"
    assert train_deep.main([*TINY, "--output", str(out)]) == 0
    capsys.readouterr()
    (out / "metrics.json").unlink()  # an unfinished HSIC run
    before = tree(out)
    line = refused(train_backprop.main, [*NET, "--output", str(out)], capsys)
    assert "holds a hsic run, not a backprop run" in line
    assert tree(out) == before


def test_relative_output_inside_a_ray_job_is_refused(monkeypatch):
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {"working_dir": "."}}))
    with pytest.raises(OutputLocationError, match="relative.*temporary copy.*absolute path"):
        check_location("runs/a")
    assert check_location("/tmp/runs/a") == "/tmp/runs/a"


def test_resume_of_nothing_and_a_missing_gpu_create_no_directory(in_tmp, capsys):
    assert "holds no run to continue" in refused(train_deep.main, [*TINY, "--resume", "--output", "new"], capsys)
    assert "no CUDA device" in refused(train_deep.main, [*TINY, "--device", "cuda", "--output", "gpu"], capsys)
    assert not (in_tmp / "new").exists() and not (in_tmp / "gpu").exists()


def test_claim_is_read_only(tmp_path):
    assert not claim(str(tmp_path / "fresh"), "hsic").interrupted
    assert not (tmp_path / "fresh").exists()
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "hsic-ray-run.json").write_text("[1, 2]")
    with pytest.raises(OutputExistsError, match="names no kind of run"):
        claim(str(tmp_path / "odd"), "hsic")


# --- config values ----------------------------------------------------------------------------------------


def _leaf_fields(obj, prefix=""):
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _leaf_fields(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f.type


# Values no field of their type accepts. Every string field of the config is a choice, except these.
BAD = {"int": ["-1", "abc", "1.5", "inf"], "float": ["nan", "inf", "-inf", "-1", "abc"], "bool": ["maybe", "2"]}
FREE_TEXT = {"data.root": None, "output": [""], "ray.address": ["no-port", "127.0.0.1:0"], "preset": ["nope"]}
SIGNED = {"hsic.input_weight_first"}  # numbers below 0 are settings of these ("early layers keep the input")


def _bad_values(field: str, kind: str) -> list[str]:
    if field in FREE_TEXT:
        return FREE_TEXT[field] or []
    for name, values in BAD.items():
        if name in kind:
            return [v for v in values if not (field in SIGNED and v.startswith("-"))]
    return ["no-such-choice"]  # str fields with a fixed set of values


def test_random_bad_values_of_every_field_get_one_line_and_write_nothing(in_tmp, capsys):
    """Property-style: every config field, with bad values drawn at random for its type."""
    rng = random.Random(12)
    fields = list(_leaf_fields(ExperimentConfig()))
    assert len(fields) > 40
    tried = 0
    for field, kind in fields:
        values = _bad_values(field, str(kind))
        for value in rng.sample(values, min(2, len(values))):
            out = in_tmp / "out"
            given = [f"{field}={value}"] if field == "output" else ["--output", str(out), f"{field}={value}"]
            line = refused(train_deep.main, [*TINY, *given], capsys)  # TINY: were one accepted, it would be short
            assert field.split(".")[-1] in line or "--output" in line or "address" in line, (field, value, line)
            assert not out.exists(), (field, value)
            tried += 1
    assert tried > 80
    assert not ray.is_initialized()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--seed", "-7"], "train.seed=-7 is invalid"),
        (["--lr", "inf"], "optim.lr=inf is invalid: expected a finite number"),
        (["--beta", "inf"], "hsic.beta=inf is invalid"),
        (["--sigma", "inf"], "hsic.sigma=inf is invalid"),
        (["ray.placement_timeout_s=-1"], "ray.placement_timeout_s=-1.0 is invalid"),
        (["train.eval_samples=8000"], "train.eval_samples=8000 is invalid"),
        (["--width", "1000000"], "needs about .* GiB .* lower --width"),
        (["--depth", "100000", "--width", "4096"], "needs about .* GiB"),
        (["--depth", "0"], "model.depth=0 is invalid"),
        (["--dataset", "imagenet"], "data.source='imagenet' is invalid"),
        (["--dataset", "npz:/nonexistent/data.npz"], "/nonexistent/data.npz"),
        (["--config", "/nonexistent/run.yaml"], "does not exist"),
        (["--batch-size", "9000"], "train.batch_size=9000 exceeds the 8000 training samples"),
        (["hsic.nope=1"], "Key 'nope' not in 'HSICConfig'"),
        (["model.depth=abc"], re.escape("could not be converted to Integer (key: model.depth)")),
        (["hsic.eps=-1"], "hsic.eps=-1.0 is invalid"),
        (
            ["--dataset", "cifar10", "--data-family", "mnist"],
            re.escape("data.family='mnist' is invalid: expected cifar10 (or null)"),
        ),
        (["data.family=svhn"], "data.family='svhn' is invalid: expected one of mnist, fashion-mnist, cifar10"),
        (
            ["hsic.sigma=median"],
            re.escape("hsic.sigma='median' is invalid: median is written null") + ".*hsic.sigma=null",
        ),
        (["--format-lr", "1e10"], "head.lr=10000000000.0 is invalid: expected a positive number below 10"),
        (["--lr", "1e10"], "optim.lr=10000000000.0 is invalid: expected a positive number below 10"),
    ],
)
def test_everyday_mistakes_are_one_line(in_tmp, capsys, argv, message):
    line = refused(train_deep.main, [*TINY, *argv, "--output", "out"], capsys)
    assert re.search(message, line), line
    assert not (in_tmp / "out").exists()


@pytest.mark.parametrize(
    "main, argv, flag, hint",
    [
        (train_deep.main, ["--detph", "5"], "--detph", "--depth"),
        (train_deep.main, ["--batch_size", "64"], "--batch_size", "--batch-size"),
        (train_deep.main, ["hsic.eps=1e-4", "--detph", "5", "train.seed=3"], "--detph", "--depth"),
        (train_backprop.main, ["--batch_size", "64"], "--batch_size", "--batch-size"),
    ],
)
def test_an_unknown_flag_is_named_with_the_closest_one_even_before_settings(in_tmp, capsys, main, argv, flag, hint):
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--output", "out"])
    assert exit_.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: unrecognized arguments: {flag}"), lines
    assert f"did you mean {hint}?" in lines[0] and "is not KEY=VALUE" not in lines[0], lines
    assert not (in_tmp / "out").exists()


def test_a_setting_that_is_not_key_value_is_still_refused(in_tmp, capsys):
    with pytest.raises(SystemExit) as exit_:
        train_deep.main(["--depth", "2", "5", "--output", "out"])
    assert exit_.value.code == 2
    assert "argument KEY=VALUE: '5' is not KEY=VALUE" in capsys.readouterr().err


@pytest.mark.parametrize("content", [b"model: {width: [\n", b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe"])
def test_a_config_file_that_is_not_yaml_is_one_line(in_tmp, capsys, content):
    (in_tmp / "bad.yaml").write_bytes(content)
    assert "is not valid YAML" in refused(train_deep.main, [*TINY, "--config", "bad.yaml", "--output", "out"], capsys)


def test_a_preset_named_in_the_config_file_is_used(tmp_path):
    (tmp_path / "run.yaml").write_text("preset: paper_mlp\ntrain: {epochs: 3}\n")
    args = train_deep.parse_args(["--config", str(tmp_path / "run.yaml")])
    from hsic_ray.cli import HSIC_FLAGS, build_run_config

    cfg = build_run_config(args, HSIC_FLAGS)
    assert cfg.preset == "paper_mlp" and cfg.model.width == 1024 and cfg.train.epochs == 3
    args = train_deep.parse_args(["--config", str(tmp_path / "run.yaml"), "--preset", "deep_mlp"])
    assert build_run_config(args, HSIC_FLAGS).preset == "deep_mlp"  # the flag wins over the file
    assert build_run_config(train_deep.parse_args([]), HSIC_FLAGS).preset == "deep_mlp"


def test_an_interrupted_run_whose_config_is_missing_or_broken_is_one_line(in_tmp, capsys):
    out = in_tmp / "run"
    assert train_deep.main([*TINY, "--output", str(out)]) == 0
    capsys.readouterr()
    (out / "metrics.json").unlink()
    (out / "config.yaml").write_text("model: [broken\n")
    assert "config.yaml is broken" in refused(train_deep.main, [*TINY, "--output", str(out)], capsys)
    (out / "config.yaml").unlink()
    assert "without its config.yaml" in refused(train_deep.main, [*TINY, "--output", str(out)], capsys)


# --- data -------------------------------------------------------------------------------------------------


def _npz(path, y_train, y_test):
    rng = np.random.default_rng(0)
    np.savez(
        path,
        x_train=rng.integers(0, 256, (len(y_train), 8, 8), dtype=np.uint8),
        y_train=np.asarray(y_train),
        x_test=rng.integers(0, 256, (len(y_test), 8, 8), dtype=np.uint8),
        y_test=np.asarray(y_test),
    )
    return f"npz:{path}"


@pytest.mark.parametrize(
    "y_train, y_test, message",
    [
        ([0] * 40, [0] * 8, "only class 0: a classifier needs at least 2 classes"),
        ([i % 10 * 1000 for i in range(40)], [0, 1000] * 4, "labels run up to 9000 but y_train has only 10 distinct"),
        ([i % 3 for i in range(40)], [0, 1, 2, 3] * 2, "y_test has classes that y_train never shows \\(3\\)"),
        ([i % 2 * 2**40 for i in range(40)], [0] * 8, "labels run up to 1099511627776"),
    ],
)
def test_labels_that_are_not_class_indices_are_refused(in_tmp, capsys, y_train, y_test, message):
    source = _npz(in_tmp / "d.npz", y_train, y_test)
    line = refused(train_deep.main, [*TINY, "--dataset", source, "--batch-size", "8", "--output", "out"], capsys)
    assert re.search(message, line), line
    assert not (in_tmp / "out").exists()


def test_prepare_refuses_an_output_that_is_a_file(tmp_path, capsys):
    from hsic_ray.data import main as prepare

    (tmp_path / "f").write_text("x")
    assert prepare(["prepare", "--source", "mnist-sample", "--output", str(tmp_path / "f")]) == 2
    assert "is a file" in capsys.readouterr().err
    assert (tmp_path / "f").read_text() == "x"


# --- connections and resources ----------------------------------------------------------------------------


def test_addresses_that_lead_nowhere_fail_in_seconds():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ClusterConnectionError, match=f"nothing answers at 127.0.0.1:{port}.*ray start --head"):
        check_address(f"127.0.0.1:{port}")
    for bad in ("notanaddress", "http://127.0.0.1:8265", "host:99999"):
        with pytest.raises(ClusterConnectionError, match="is not a Ray cluster address"):
            check_address(bad)


def test_a_bad_ray_address_from_the_environment_is_named_as_ray_address(monkeypatch):
    monkeypatch.setattr(connect_module, "default_auth_mode", lambda: None)
    monkeypatch.setenv("RAY_ADDRESS", "notanaddress")
    with pytest.raises(ClusterConnectionError) as err:
        connect_module.connect(None, 1)
    assert "RAY_ADDRESS='notanaddress' is not a Ray cluster address" in str(err.value)
    assert "--ray-address" not in str(err.value)
    with pytest.raises(ClusterConnectionError, match="--ray-address 'host:0' is not a Ray cluster address"):
        connect_module.connect("host:0", 1)  # the flag's value wins over RAY_ADDRESS, and is named as the flag
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    with pytest.raises(ClusterConnectionError, match="nothing answers at .*; .* or fix or unset RAY_ADDRESS$"):
        connect_module.connect(None, 1)
    assert not ray.is_initialized()


def test_a_port_held_by_something_else_than_ray_fails_in_seconds(monkeypatch):
    monkeypatch.setattr(connect_module, "GCS_TIMEOUT_S", 2.0)
    with socket.socket() as server:  # accepts connections, never speaks Ray's protocol
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        with pytest.raises(ClusterConnectionError, match="accepts connections but gives no Ray head's answer"):
            check_address(f"127.0.0.1:{port}")


@pytest.mark.slow
def test_job_with_a_dead_address_or_no_cluster_exits_at_once(tmp_path):
    """As a user runs it (a subprocess, with Ray's own environment): one line, no hang, nothing written."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    for address, message in (("127.0.0.1:1", "nothing answers at 127.0.0.1:1"), ("auto", "no Ray cluster runs")):
        proc = subprocess.run(
            [
                sys.executable,
                str(ROOT / "jobs" / "train_deep.py"),
                "--smoke-test",
                "--ray-address",
                address,
                "--output",
                str(tmp_path / "out"),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
        )
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
        assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
        assert not (tmp_path / "out").exists()


def test_requests_beyond_this_machine_are_refused_before_ray_starts(in_tmp, capsys):
    line = refused(train_deep.main, [*NET, "--cpus-per-stage", "100000", "--output", "out"], capsys)
    assert "asks for 100000 CPUs and this machine has" in line
    line = refused(train_backprop.main, [*NET, "--workers", "64", "--batch-size", "256", "--output", "bp"], capsys)
    assert "65 Ray worker processes need about" in line
    assert not ray.is_initialized()
    assert not (in_tmp / "out").exists() and not (in_tmp / "bp").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--depth", "0"], "model.depth=0 is invalid"),
        (["--dataset", "npz:/nonexistent/data.npz"], "/nonexistent/data.npz"),
    ],
)
def test_backprop_mistakes_are_one_line(in_tmp, capsys, argv, message):
    line = refused(train_backprop.main, [*NET, *argv, "--output", "bp"], capsys)
    assert message in line
    assert not ray.is_initialized() and not (in_tmp / "bp").exists()


# --- sweeps -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--stages-per-trial", "0"], "--stages-per-trial 0 is invalid"),
        (["--stages-per-trial", "9", "--depths", "2"], "ray.stages=9 is invalid: expected at most the 4"),
        (["--gpus-per-stage", "-1"], "--gpus-per-stage -1.0 is invalid"),
        (["--max-concurrent", "0"], "--max-concurrent 0 is invalid"),
        (["--grid", "train.batch_size=100000"], "train.batch_size=100000 exceeds the 8000 training samples"),
        (["--depths", "0"], "--depths \\[0\\] is invalid"),
        (["--grid", "model.init=default,ortho"], "model.init='ortho' is invalid"),
        (["--grid", "model.depth=3,4"], "give depths with --depths"),
    ],
)
def test_sweep_settings_are_checked_before_ray_starts(in_tmp, capsys, argv, message):
    line = refused(sweep_depth.main, ["--depths", "1", "--methods", "backprop", *argv, "--output", "sw"], capsys)
    assert re.search(message, line), line
    assert not ray.is_initialized() and not (in_tmp / "sw").exists()


def test_user_errors_cover_every_error_the_checks_raise():
    from hsic_ray.errors import ResourceError
    from hsic_ray.run.claim import NothingToResumeError

    for error in (
        OutputLocationError,
        OutputExistsError,
        NothingToResumeError,
        ResourceError,
        ClusterConnectionError,
        config_module.ConfigError,
    ):
        assert issubclass(error, USER_ERRORS)


@pytest.mark.slow
def test_resume_with_another_stage_count_is_refused_before_any_actor_starts(tmp_path):
    from hsic_ray.config import ConfigError, build_config
    from hsic_ray.experiment import run_hsic

    def config(stages):
        overrides = {
            "model.depth": 2,
            "model.width": 16,
            "train.max_steps": 4,
            "train.eval_samples": 64,
            "head.epochs": 1,
            "ray.stages": stages,
            "output": str(tmp_path / "run"),
        }
        return build_config("paper_mlp", overrides=overrides)

    ray.init(address="local", num_cpus=4, include_dashboard=False)
    try:
        run_hsic(config(2))
        (tmp_path / "run" / "metrics.json").unlink()  # interrupted after its last checkpoint
        before = tree(tmp_path / "run")
        with pytest.raises(ConfigError, match="written by 2 stages; resume with --stages 2"):
            run_hsic(config(3))
        assert tree(tmp_path / "run") == before  # placements.json and metrics.jsonl untouched
        assert run_hsic(config(None))["stages"] == 2  # without --stages it keeps the checkpoint's count
    finally:
        shutdown()

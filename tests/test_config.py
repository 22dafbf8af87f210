import pytest

from hsic_ray.config import (
    NULL,
    ConfigError,
    ExperimentConfig,
    build_config,
    config_from_yaml_text,
    dataset_family,
    save_config,
)
from hsic_ray.presets import PRESETS


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_validate_and_round_trip_through_yaml(name):
    cfg = build_config(name)
    assert cfg.preset == name
    assert config_from_yaml_text(save_config(cfg)) == cfg


def test_paper_mlp_matches_the_authors_config():
    cfg = build_config("paper_mlp")
    assert (cfg.model.depth, cfg.model.width, cfg.model.last_width) == (5, 1024, 10)
    assert (cfg.hsic.sigma, cfg.hsic.beta, cfg.optim.lr, cfg.train.batch_size) == (6.0, 200.0, 1e-4, 256)
    assert cfg.num_hsic_layers == 7


@pytest.mark.parametrize("source, beta", [("mnist-sample", 200.0), ("fashion-mnist", 1000.0), ("cifar10", 2500.0)])
def test_preset_beta_follows_the_dataset(source, beta):
    assert build_config("paper_mlp", overrides={"data.source": source}).hsic.beta == beta


def test_yaml_file_then_overrides_apply_in_order(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("preset: paper_resconv\nmodel:\n  depth: 3\nhsic:\n  beta: 77\n")
    cfg = build_config(None, path, {"model.depth": 4, "train.epochs": None})
    assert cfg.preset == "paper_resconv" and cfg.model.arch == "resconv"
    assert cfg.model.depth == 4  # the override beats the file
    assert cfg.hsic.beta == 77.0  # the file beats the preset
    assert cfg.train.epochs == 5  # None means "flag not given"


def test_null_override_sets_a_field_to_none():
    assert build_config("paper_mlp", overrides={"hsic.sigma": NULL}).hsic.sigma is None


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"model.depth": 0}, "model.depth=0 is invalid: expected a number >= 1"),
        ({"hsic.estimator": "nope"}, "hsic.estimator='nope' is invalid: expected one of cca, biased, cka, plausible"),
        ({"hsic.beta": -1.0}, "hsic.beta=-1.0 is invalid"),
        ({"hsic.sigma": 0.0}, "hsic.sigma=0.0 is invalid"),
        (
            {"hsic.estimator": "cka", "hsic.leave_one_out": True},
            "hsic.leave_one_out=True is invalid: expected false with hsic.estimator other than cca",
        ),
        ({"data.source": "imagenet"}, "data.source='imagenet' is invalid"),
        ({"train.batch_size": 1}, "train.batch_size=1 is invalid"),
        ({"optim.momentum": 1.0}, "optim.momentum=1.0 is invalid"),
        ({"optim.schedule": "linear"}, "optim.schedule='linear' is invalid: expected one of constant, cosine"),
        ({"backprop.schedule": "step"}, "backprop.schedule='step' is invalid: expected one of constant, cosine"),
        ({"model.activation": "gelu"}, "model.activation='gelu' is invalid: expected one of relu, tanh, sigmoid, elu"),
        ({"model.init": "xavier"}, "model.init='xavier' is invalid: expected one of default, orthogonal"),
        ({"model.depth": "deep"}, "model.depth"),
        ({"model.size": 3}, "Key 'size' not in 'ModelConfig'"),
        ({"preset": "tiny"}, "preset='tiny' is invalid"),
        ({"ray.factors_on": "gpu"}, "ray.factors_on='gpu' is invalid: expected one of coordinator, first_stage"),
        (
            {"train.checkpoint_seconds": -5},
            "train.checkpoint_seconds=-5.0 is invalid: expected seconds >= 0 between checkpoints (0: none by time)",
        ),
        ({"optim.lr": 1e10}, "optim.lr=10000000000.0 is invalid: expected a positive number below 10"),
        ({"optim.lr": 10}, "optim.lr=10.0 is invalid: expected a positive number below 10"),
        ({"head.lr": 1e10}, "head.lr=10000000000.0 is invalid: expected a positive number below 10"),
        ({"backprop.lr": 50.0}, "backprop.lr=50.0 is invalid: expected a positive number below 10"),
        ({"optim.lr": 0}, "optim.lr=0.0 is invalid: expected a positive number below 10"),
        ({"hsic.sigma": "median"}, "hsic.sigma='median' is invalid: median is written null in a KEY=VALUE setting"),
        ({"hsic.max_kernel_features": "full"}, "(hsic.max_kernel_features=null)"),
    ],
)
def test_bad_values_name_the_field_and_what_it_accepts(overrides, message):
    with pytest.raises(ConfigError) as err:
        build_config("paper_mlp", overrides=overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_or_malformed_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        build_config("paper_mlp", tmp_path / "absent.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        build_config("paper_mlp", bad)


def test_learning_rates_just_below_the_bound_are_accepted():
    cfg = build_config("paper_mlp", overrides={"optim.lr": 9.5, "head.lr": 9.99, "backprop.lr": 5})
    assert (cfg.optim.lr, cfg.head.lr, cfg.backprop.lr) == (9.5, 9.99, 5.0)


def test_the_median_heuristic_is_null_in_a_config_file(tmp_path):
    (tmp_path / "median.yaml").write_text("hsic:\n  sigma: median\n")
    with pytest.raises(ConfigError, match=r"hsic.sigma='median' is invalid: .*\(hsic.sigma=null\)"):
        build_config("paper_mlp", tmp_path / "median.yaml")
    (tmp_path / "null.yaml").write_text("hsic:\n  sigma: null\n")
    assert build_config("paper_mlp", tmp_path / "null.yaml").hsic.sigma is None


def test_a_key_twice_in_a_config_file_is_named_with_its_line(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text("model:\n  width: 64\n  depth: 3\n  depth: 4\n")
    with pytest.raises(ConfigError) as err:
        build_config("paper_mlp", path)
    assert "sets 'depth' twice in one section (line 4)" in str(err.value)
    assert "\n" not in str(err.value)


def test_default_config_is_valid():
    assert build_config() == ExperimentConfig()


FASHION_FILE = "npz:/work/shared/datasets/fashion-mnist-dev.npz"


@pytest.mark.parametrize(
    "preset, family, beta",
    [
        ("paper_mlp", None, 200.0),
        ("paper_mlp", "fashion-mnist", 1000.0),
        ("paper_mlp", "cifar10", 2500.0),
        ("deep_mlp", "fashion-mnist", 1000.0),
        ("paper_resconv", "cifar10", 500.0),
    ],
)
def test_a_file_source_gets_the_settings_of_its_data_family(preset, family, beta):
    cfg = build_config(preset, overrides={"data.source": FASHION_FILE, "data.family": family})
    assert cfg.hsic.beta == beta and cfg.data.family == family  # None: the MNIST settings, as before


def test_the_data_family_is_read_from_the_config_file_as_the_source_is(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(f"preset: paper_mlp\ndata: {{source: '{FASHION_FILE}', family: cifar10}}\n")
    assert build_config(None, path).hsic.beta == 2500.0
    assert build_config(None, path, {"data.family": "fashion-mnist"}).hsic.beta == 1000.0  # the override wins


@pytest.mark.parametrize(
    "source, family", [("mnist-sample", "mnist"), ("fashion-mnist", "fashion-mnist"), ("cifar10", "cifar10")]
)
def test_a_named_source_infers_its_family_and_accepts_it_spelled_out(source, family):
    inferred = build_config("deep_mlp", overrides={"data.source": source})
    spelled = build_config("deep_mlp", overrides={"data.source": source, "data.family": family})
    assert dataset_family(source) == family and inferred.hsic.beta == spelled.hsic.beta


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            {"data.source": "cifar10", "data.family": "mnist"},
            "data.family='mnist' is invalid: expected cifar10 (or null) for data.source='cifar10'",
        ),
        ({"data.family": "fashion-mnist"}, "expected mnist (or null) for data.source='mnist-sample'"),
        (
            {"data.source": FASHION_FILE, "data.family": "svhn"},
            "data.family='svhn' is invalid: expected one of mnist, fashion-mnist, cifar10",
        ),
    ],
)
def test_a_bad_or_contradicting_family_is_refused_in_one_line(overrides, message):
    for preset in ("paper_mlp", None):  # built into the preset, or only validated
        with pytest.raises(ConfigError) as err:
            build_config(preset, overrides=overrides)
        assert message in str(err.value) and "\n" not in str(err.value)


def test_the_saved_config_keeps_the_family_and_round_trips():
    cfg = build_config("paper_mlp", overrides={"data.source": FASHION_FILE, "data.family": "fashion-mnist"})
    text = save_config(cfg)
    assert "family: fashion-mnist" in text and config_from_yaml_text(text) == cfg
    assert build_config(None, None, {"preset": "paper_mlp", "data.source": FASHION_FILE}).data.family is None


def test_every_job_takes_data_family():
    import sys
    from pathlib import Path

    from hsic_ray.cli import HSIC_FLAGS, RUN_FLAGS, build_run_config

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs"))
    import sweep_depth
    import train_backprop
    import train_deep

    argv = ["--preset", "paper_mlp", "--dataset", FASHION_FILE, "--data-family", "fashion-mnist"]
    assert build_run_config(train_deep.parse_args(argv), RUN_FLAGS, HSIC_FLAGS).hsic.beta == 1000.0
    assert build_run_config(train_backprop.parse_args(argv), RUN_FLAGS).data.family == "fashion-mnist"

    spec = sweep_depth.build_spec(sweep_depth.parse_args([*argv, "--depths", "2", "5"]))
    assert [cfg.hsic.beta for cfg in spec.trial_configs()] == [1000.0, 1000.0]


def test_train_deep_pipeline_flags_reach_the_ray_config():
    import sys
    from pathlib import Path

    from hsic_ray.cli import HSIC_FLAGS, RUN_FLAGS, build_run_config

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs"))
    import train_deep

    argv = [
        "--stages",
        "3",
        "--gpus-per-stage",
        "0.5",
        "--cpus-per-stage",
        "2",
        "--strategy",
        "SPREAD",
        "--max-in-flight",
        "7",
        "--batches-per-call",
        "4",
        "--factors-on",
        "first_stage",
    ]
    ray = build_run_config(train_deep.parse_args(argv), RUN_FLAGS, HSIC_FLAGS).ray
    assert (ray.stages, ray.gpus_per_stage, ray.cpus_per_stage, ray.strategy) == (3, 0.5, 2.0, "SPREAD")
    assert (ray.max_in_flight, ray.batches_per_call, ray.factors_on) == (7, 4, "first_stage")
    assert build_run_config(train_deep.parse_args([]), RUN_FLAGS, HSIC_FLAGS).ray.factors_on is None
    with pytest.raises(SystemExit):
        train_deep.parse_args(["--factors-on", "gpu"])


def test_train_deep_checkpoint_flags_reach_the_train_config():
    import sys
    from pathlib import Path

    from hsic_ray.cli import HSIC_FLAGS, RUN_FLAGS, build_run_config

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs"))
    import train_deep

    def train(*argv):
        return build_run_config(train_deep.parse_args(list(argv)), RUN_FLAGS, HSIC_FLAGS).train

    assert (train().checkpoint_seconds, train().checkpoint_every) == (60.0, 0)
    chosen = train("--checkpoint-seconds", "0", "--checkpoint-every", "25")
    assert (chosen.checkpoint_seconds, chosen.checkpoint_every) == (0.0, 25)


def test_the_command_line_and_config_import_neither_torch_nor_ray():
    import subprocess
    import sys

    probe = (
        "import sys, hsic_ray.cli, hsic_ray.config, hsic_ray.errors; print(sorted({'torch', 'ray'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def _job(name):
    import importlib
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs"))
    return importlib.import_module(name)


def test_run_directories_say_what_ran():
    import re

    from hsic_ray.cli import HSIC_FLAGS, RUN_FLAGS, build_run_config
    from hsic_ray.config import default_output

    train_deep = _job("train_deep")
    assert re.fullmatch(r"runs/paper_mlp-hsic-\d{8}-\d{6}", default_output("paper_mlp", "hsic"))
    assert re.fullmatch(r"runs/deep_mlp-backprop-\d{8}-\d{6}", default_output("deep_mlp", "backprop"))
    assert re.fullmatch(r"runs/hsic-\d{8}-\d{6}", default_output(None, "hsic"))  # no preset: no empty part

    def output(*argv):
        return build_run_config(train_deep.parse_args(list(argv)), RUN_FLAGS, HSIC_FLAGS).output

    assert re.fullmatch(r"runs/deep_mlp-smoke-\d{8}-\d{6}", output("--smoke-test"))
    assert re.fullmatch(r"runs/paper_mlp-smoke-\d{8}-\d{6}", output("--smoke-test", "--preset", "paper_mlp"))
    assert output("--smoke-test", "--output", "mine") == "mine"
    assert output() is None  # the run names it when it starts (run.start.plan_start): -hsic- or -backprop-


def test_accuracies_print_with_two_decimals_or_n_a():
    from hsic_ray.cli import accuracy_text

    assert accuracy_text(61.550000000000004) == "61.55"
    assert accuracy_text(100.0) == "100.00"
    assert accuracy_text(None) == "n/a"


def test_flags_take_type_choices_and_help_from_the_config_fields(capsys):
    from hsic_ray.cli import HSIC_FLAGS, RUN_FLAGS, build_run_config
    from hsic_ray.config import config_field

    train_deep = _job("train_deep")
    with pytest.raises(SystemExit):
        train_deep.parse_args(["--help"])
    shown = " ".join(capsys.readouterr().out.split())
    for dotted in ("hsic.beta", "ray.factors_on", "train.checkpoint_seconds", "model.init"):
        assert " ".join(config_field(dotted).metadata["help"].split()) in shown and f"({dotted})" in shown
    cfg = build_run_config(train_deep.parse_args(["--sigma", "median", "--concurrent-head"]), RUN_FLAGS, HSIC_FLAGS)
    assert cfg.hsic.sigma is None and cfg.head.concurrent is True
    assert build_run_config(train_deep.parse_args([]), RUN_FLAGS, HSIC_FLAGS).head.concurrent is False  # the preset's
    with pytest.raises(SystemExit):
        train_deep.parse_args(["--sigma", "wide"])
    assert "invalid float or 'median' value: 'wide'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_deep.parse_args(["--depth", "1.5"])
    assert "invalid int value: '1.5'" in capsys.readouterr().err


def test_the_sweep_smoke_test_is_the_jobs_smoke_test_over_two_depths():
    from hsic_ray.presets import SMOKE_TEST

    sweep_depth = _job("sweep_depth")
    spec = sweep_depth.build_spec(sweep_depth.parse_args(["--smoke-test", "--width", "48", "--betas", "1", "2"]))
    assert spec.depths == sweep_depth.SMOKE_DEPTHS
    assert spec.overrides == {**SMOKE_TEST, "model.width": 48}  # flags beside it win, as for the jobs
    assert spec.grid == {"hsic.beta": [1.0, 2.0]}


def test_presets_share_one_base_and_differ_where_they_say():
    from hsic_ray.presets import deep_mlp, paper_mlp, paper_resconv

    mlp, conv, deep = paper_mlp(), paper_resconv(), deep_mlp()
    assert mlp.head == conv.head == deep.head and mlp.train.epochs == conv.train.epochs == deep.train.epochs == 5
    assert (mlp.train.batch_size, conv.train.batch_size, deep.train.batch_size) == (256, 512, 512)
    assert (conv.model.arch, conv.hsic.sigma, conv.optim.schedule) == ("resconv", 5.0, "constant")
    assert deep.hsic.leave_one_out and not mlp.hsic.leave_one_out and not conv.hsic.leave_one_out


def test_job_help_imports_neither_torch_nor_ray():
    import pathlib
    import subprocess
    import sys

    jobs = pathlib.Path(__file__).resolve().parents[1] / "jobs"
    for job in ("train_deep", "train_backprop", "sweep_depth"):
        probe = (
            f"import runpy, sys; sys.argv = ['{job}', '--help']\n"
            f"try:\n    runpy.run_path({str(jobs / (job + '.py'))!r}, run_name='__main__')\n"
            "except SystemExit:\n    pass\n"
            "print(sorted({'torch', 'ray'} & set(sys.modules)), file=sys.stderr)"
        )
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
        assert out.stderr.strip().splitlines()[-1] == "[]", (job, out.stderr)


@pytest.mark.parametrize("value", [0, -2])
def test_a_factor_group_below_one_is_refused_before_anything_runs(value):
    with pytest.raises(ConfigError, match=r"train.factor_group=.* is invalid: expected a number >= 1 or null \(auto\)"):
        build_config("paper_mlp", overrides={"train.factor_group": value})
    cfg = build_config("paper_mlp", overrides={"train.factor_group": 4})
    assert config_from_yaml_text(save_config(cfg)).train.factor_group == 4

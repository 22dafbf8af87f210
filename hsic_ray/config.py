"""Typed run configuration: dataclasses, named presets, YAML files and command-line overrides.

A config is built once at the edge (`build_config`): preset, then YAML file, then overrides, then one
validation pass whose errors name the field and what it accepts. The result is plain data: it is saved
with every run and checkpoint and rebuilt from that file (`load_saved_config`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from hsic_ray.errors import ConfigError

ARCHITECTURES = ("mlp", "resconv")
ACTIVATIONS = ("relu", "tanh", "sigmoid", "elu")
INITS = ("default", "orthogonal")
ESTIMATORS = ("cca", "biased", "cka", "plausible")  # hsic_ray.hsic.make_estimator
TRAINERS = ("local", "ray")
CUDA_GRAPHS = ("auto", "on", "off")
LR_SCHEDULES = ("constant", "cosine")  # hsic_ray.schedule
STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
FACTORS_ON = ("coordinator", "first_stage")  # hsic_ray.distributed.ray_pipeline
DATASET_NAMES = ("mnist-sample", "mnist", "fashion-mnist", "cifar10")
DATASET_PREFIXES = ("npz:", "parquet:")
# Which of the authors' per-dataset settings (the presets' beta) a run gets; a file source names its own.
DATASET_FAMILIES = ("mnist", "fashion-mnist", "cifar10")


@dataclass
class DataConfig:
    source: str = "mnist-sample"  # a name in DATASET_NAMES, or npz:PATH, or parquet:URI
    root: str = "~/.cache/hsic-ray/data"  # where torchvision datasets live (and download to)
    download: bool = True
    test_fraction: float = 0.2  # held-out share of mnist-sample (the file has no split of its own)
    split_seed: int = 1234  # fixes that split independently of the training seed
    # mnist | fashion-mnist | cifar10: whose settings the presets apply (beta). None: inferred from a named
    # source, mnist for npz: and parquet: files.
    family: str | None = None


@dataclass
class ModelConfig:
    arch: str = "mlp"
    depth: int = 5  # hidden width x width blocks (mlp) or residual blocks (resconv)
    width: int = 1024  # hidden width (mlp) or channels (resconv)
    last_width: int = 10  # output of the last HSIC-trained layer
    activation: str = "relu"
    # "orthogonal": weights with orthonormal rows or columns and zero biases, so that with an invertible
    # activation (tanh, elu) an untrained layer loses no information.
    init: str = "default"  # "default": PyTorch's


@dataclass
class HSICConfig:
    estimator: str = "cca"
    sigma: float | None = 6.0  # None: median heuristic
    beta: float = 200.0
    eps: float = 1e-5  # cca regulariser
    # Extensions beyond the paper (hsic_ray.objective, hsic_ray.stage_step), off unless set; off in the paper_* presets
    # (deep_mlp sets leave_one_out).
    layer_sigma: float | None = None  # kernel width for the layers' outputs Z; None: sigma, as in the paper
    # Weight on nHSIC(Z, X) at the first HSIC layer, rising linearly to 1 at the last; 1: the paper's
    # objective; below 0: early layers keep information about the input (InfoPro-like).
    input_weight_first: float = 1.0
    # Learning-rate multiplier of the last HSIC layer, falling geometrically from 1 at the first: deep layers
    # take smaller steps (1: every layer at optim.lr, as in the paper).
    lr_scale_last: float = 1.0
    # Score nHSIC as a leave-one-out fit (hsic_ray.hsic.cca_inner): a layer is not rewarded for dimensions that
    # fit only its own batch, which 50 layers in a row otherwise pile up (README, "Depth on Fashion-MNIST").
    leave_one_out: bool = False


@dataclass
class OptimConfig:
    """SGD for every HSIC-trained layer; each layer keeps its own optimizer (and momentum) for the run."""

    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 1e-3
    schedule: str = "constant"  # or "cosine": lr annealed to 0 over the run (hsic_ray.schedule)


@dataclass
class HeadConfig:
    """The linear format head: SGD + cross-entropy on the frozen network's output."""

    epochs: int = 5
    lr: float = 0.005
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 256
    concurrent: bool = False  # also train it on detached features while the HSIC layers train


@dataclass
class TrainConfig:
    batch_size: int = 256
    epochs: int = 5
    max_steps: int | None = None  # stop HSIC training after this many steps
    seed: int = 1234
    log_every: int = 10  # steps between progress lines / metrics.jsonl records
    eval_samples: int = 512  # size of the fixed batch the information plane is measured on
    # Linear probes of every layer each epoch, on this many fixed training samples and half as many test
    # samples (hsic_ray.probes), and on the full splits at the end. 0: no probes.
    probe_samples: int = 2000
    device: str = "auto"  # auto | cpu | cuda
    # A checkpoint once this many seconds have passed since the last one (0: none by time). Time, not steps,
    # makes the default suit any hardware: a step takes 100 ms on a CPU stage and a millisecond on a GPU one,
    # and each checkpoint waits for every batch in flight and writes every stage's state.
    checkpoint_seconds: float = 60.0
    checkpoint_every: int = 0  # also a checkpoint at every multiple of this many steps (0: none by steps)
    # Training batches that BatchNorm statistics are recomputed on after each epoch, with the epoch's final
    # weights (0: keep the moving averages that training left, which lag behind the weights).
    bn_calibration_batches: int = 20
    # Each stage's training step as one CUDA graph, replayed per batch. auto: on CUDA devices; on: required.
    cuda_graphs: str = "auto"
    tensorboard: bool = (
        False  # HSIC runs: TensorBoard event files in <output>/tensorboard/ (needs the tensorboard package)
    )


@dataclass
class RayConfig:
    """How `--trainer ray` lays the layers out as stage actors and feeds them."""

    address: str | None = None  # None: RAY_ADDRESS, else a running local cluster, else start one
    stages: int | None = None  # None: one per GPU when the cluster has GPUs, else one per free CPU
    gpus_per_stage: float | None = None  # None: 1 when the cluster has GPUs, else 0
    cpus_per_stage: float = 1.0
    coordinator_cpus: float = 1.0
    strategy: str = "PACK"  # PACK | SPREAD | STRICT_PACK | STRICT_SPREAD (STRICT_SPREAD: one stage per node)
    max_in_flight: int | None = None  # batches submitted but not finished; None: 2 x stages x batches_per_call
    # Consecutive batches a stage takes per actor call (results equal one call per batch); None: chosen from
    # the first groups' measured step time and wait between calls, so that Ray's cost per call stays under a
    # tenth of the call's compute (hsic_ray.distributed.ray_pipeline.choose_batches_per_call).
    batches_per_call: int | None = None
    # Where each batch's factors (the factors of X's and Y's kernels) are computed, once for every stage:
    # coordinator (on its CPU, in a thread) or first_stage (on the first stage's device, in its step call).
    # None: first_stage when stages have GPUs, where the coordinator's CPU would bound the pipeline.
    factors_on: str | None = None
    max_recoveries: int = 10  # stage actors recreated after failures before the run gives up
    placement_timeout_s: float = 120.0
    # Joining an existing cluster: ship this hsic_ray package to the workers (Ray runtime_env py_modules), so
    # nodes need not have it installed. False: the nodes' own installation is used.
    ship_package: bool = True


@dataclass
class ExperimentConfig:
    preset: str | None = None
    trainer: str = "ray"  # ray: stage actors on a Ray cluster; local: every layer in this process
    output: str | None = None  # run directory; None: runs/<preset or name>-<timestamp>
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    hsic: HSICConfig = field(default_factory=HSICConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # The backprop baseline: the same network and head trained end to end with cross-entropy.
    backprop: OptimConfig = field(default_factory=lambda: OptimConfig(lr=0.05))
    ray: RayConfig = field(default_factory=RayConfig)

    @property
    def num_hsic_layers(self) -> int:
        """Layers trained by HSIC: input block, `depth` hidden blocks, output block."""
        return self.model.depth + 2

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --- presets ---------------------------------------------------------------------------------------------


def dataset_family(source: str, family: str | None = None) -> str:
    """mnist, fashion-mnist or cifar10: which of the authors' per-dataset settings applies.

    `family` (data.family) names it for any source; None infers it from a named source, and gives the
    MNIST settings (the sensible start) to npz / parquet files. A family that contradicts a named source
    is an error: the presets would apply one dataset's settings to another."""
    named = {"mnist": "mnist", "mnist-sample": "mnist", "fashion-mnist": "fashion-mnist", "cifar10": "cifar10"}
    if family is None:
        return named.get(source, "mnist")
    _check_choice("data.family", family, DATASET_FAMILIES)
    check_setting(
        source not in named or named[source] == family,
        "data.family",
        family,
        f"{named.get(source)} (or null) for data.source={source!r}; another family applies to npz: and parquet: files",
    )
    return family


def paper_mlp(source: str = "mnist-sample", family: str | None = None) -> ExperimentConfig:
    """The unformatted 5 x 1024 MLP of the paper's Fig. 3/4, last layer 10 wide."""
    beta = {"mnist": 200.0, "fashion-mnist": 1000.0, "cifar10": 2500.0}[dataset_family(source, family)]
    return ExperimentConfig(
        preset="paper_mlp",
        data=DataConfig(source=source, family=family),
        model=ModelConfig(arch="mlp", depth=5, width=1024, last_width=10, activation="relu"),
        hsic=HSICConfig(estimator="cca", sigma=6.0, beta=beta),
        # The authors' lr is 1e-3 with an SGD momentum that never acted (their optimizer was rebuilt every
        # step). With momentum that persists, 1e-4 takes the same effective step, lr / (1 - momentum).
        # Annealed to 0 over the run (not in the paper): on Fashion-MNIST about half a point more after one
        # epoch and a quarter after five (README, "paper_mlp against the authors' code"); backprop alike.
        optim=OptimConfig(lr=1e-4, momentum=0.9, schedule="cosine"),
        head=HeadConfig(epochs=5, lr=0.005),
        train=TrainConfig(batch_size=256, epochs=5),
        backprop=OptimConfig(lr=0.05, schedule="cosine"),
    )


def paper_resconv(source: str = "mnist-sample", family: str | None = None) -> ExperimentConfig:
    """The residual conv net of the paper's Fig. 7: 5 blocks of 64 channels, dense to 512, format head."""
    beta = {"mnist": 200.0, "fashion-mnist": 500.0, "cifar10": 500.0}[dataset_family(source, family)]
    return ExperimentConfig(
        preset="paper_resconv",
        data=DataConfig(source=source, family=family),
        model=ModelConfig(arch="resconv", depth=5, width=64, last_width=512, activation="relu"),
        hsic=HSICConfig(estimator="cca", sigma=5.0, beta=beta),
        optim=OptimConfig(lr=0.01),
        head=HeadConfig(epochs=5, lr=0.005),
        train=TrainConfig(batch_size=512, epochs=5),
        backprop=OptimConfig(lr=0.01),
    )


def deep_mlp(source: str = "mnist-sample", family: str | None = None) -> ExperimentConfig:
    """A deep MLP without skip connections, sized to train on the bundled digits in minutes on 2 cores."""
    beta = {"mnist": 2500.0, "fashion-mnist": 1000.0, "cifar10": 500.0}[dataset_family(source, family)]
    return ExperimentConfig(
        preset="deep_mlp",
        data=DataConfig(source=source, family=family),
        # Depth-robust choices (README, "Depth sweeps"). With the authors' relu and batch 256, a 50-deep net
        # ends ~7 points below a 5-deep one; elu (no dead units to drop information layer after layer) with
        # batches of 512 (steadier kernel estimates) keeps it within about a point, and orthogonal weights
        # keep it there over 15 epochs, where default init fell 5 points behind. (Elu is also what lets the
        # backprop baseline train at depth 50 at all.)
        model=ModelConfig(arch="mlp", depth=20, width=256, last_width=10, activation="elu", init="orthogonal"),
        # Not the paper's objective: each layer's nHSIC is scored as a leave-one-out fit. In-sample, a layer gains
        # by spreading its output over dimensions that fit only its batch, and 50 layers in a row pile that up
        # until the labels' linear readout fades (README, "Depth on Fashion-MNIST").
        hsic=HSICConfig(estimator="cca", sigma=6.0, beta=beta, leave_one_out=True),
        # The authors' 1e-3 without momentum (see paper_mlp), annealed: on Fashion-MNIST depth 50 gains 3
        # points with it and depth 5 half a point (README, "Depth on Fashion-MNIST").
        optim=OptimConfig(lr=1e-4, momentum=0.9, schedule="cosine"),
        head=HeadConfig(epochs=5, lr=0.005),
        train=TrainConfig(batch_size=512, epochs=5),
        backprop=OptimConfig(lr=0.01, schedule="cosine"),
    )


PRESETS: dict[str, Callable[[str, str | None], ExperimentConfig]] = {
    "paper_mlp": paper_mlp,
    "paper_resconv": paper_resconv,
    "deep_mlp": deep_mlp,
}


# --- validation ------------------------------------------------------------------------------------------


def check_setting(ok: bool, name: str, value: Any, expected: str) -> None:
    """Raise the one error every invalid setting gets: "NAME=VALUE is invalid: expected EXPECTED"."""
    if not ok:
        raise ConfigError(f"{name}={value!r} is invalid: expected {expected}")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    check_setting(value in choices, name, value, f"one of {', '.join(choices)}")


def _check_positive(name: str, value: Any, minimum: float = 1) -> None:
    check_setting(value is not None and value >= minimum, name, value, f"a number >= {minimum}")


MAX_EVAL_SAMPLES = 4096  # the information plane's batch: each layer builds an N x N kernel of it
MAX_SEED = 2**32 - 1  # numpy's seeds


def is_ray_address(address: str) -> bool:
    """auto, HOST:PORT or ray://HOST:PORT (what `ray start --head` prints, or Ray Client's address)."""
    if address == "auto":
        return True
    target = address.removeprefix("ray://")
    host, sep, port = target.rpartition(":")
    return "://" not in target and bool(sep and host) and port.isdigit() and 0 < int(port) < 65536


def _check_numbers(obj: Any, prefix: str = "") -> None:
    """Every number of every section is finite; a value of inf or nan is never a setting."""
    for f in dataclasses.fields(obj):
        value, name = getattr(obj, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            _check_numbers(value, f"{name}.")
        elif isinstance(value, float):
            check_setting(math.isfinite(value), name, value, "a finite number")


def validate(cfg: ExperimentConfig) -> ExperimentConfig:
    """Check every field once; raise ConfigError naming the first bad one and what it accepts."""
    _check_numbers(cfg)
    source = cfg.data.source
    check_setting(
        source in DATASET_NAMES or (source.startswith(DATASET_PREFIXES) and len(source) > 4),
        "data.source",
        source,
        f"one of {', '.join(DATASET_NAMES)}, npz:PATH or parquet:URI",
    )
    dataset_family(source, cfg.data.family)
    check_setting(
        0 <= cfg.data.split_seed <= MAX_SEED, "data.split_seed", cfg.data.split_seed, f"an integer in [0, {MAX_SEED}]"
    )
    check_setting(
        0.0 < cfg.data.test_fraction < 1.0, "data.test_fraction", cfg.data.test_fraction, "a fraction in (0, 1)"
    )
    _check_choice("model.arch", cfg.model.arch, ARCHITECTURES)
    _check_choice("model.activation", cfg.model.activation, ACTIVATIONS)
    _check_choice("model.init", cfg.model.init, INITS)
    _check_positive("model.depth", cfg.model.depth)
    _check_positive("model.width", cfg.model.width)
    _check_positive("model.last_width", cfg.model.last_width)
    _check_choice("hsic.estimator", cfg.hsic.estimator, ESTIMATORS)
    check_setting(
        cfg.hsic.sigma is None or cfg.hsic.sigma > 0,
        "hsic.sigma",
        cfg.hsic.sigma,
        "a positive number or null (median heuristic)",
    )
    check_setting(
        cfg.hsic.layer_sigma is None or cfg.hsic.layer_sigma > 0,
        "hsic.layer_sigma",
        cfg.hsic.layer_sigma,
        "a positive number or null (the same as hsic.sigma)",
    )
    check_setting(cfg.hsic.beta >= 0, "hsic.beta", cfg.hsic.beta, "a number >= 0")
    check_setting(cfg.hsic.lr_scale_last > 0, "hsic.lr_scale_last", cfg.hsic.lr_scale_last, "a positive number")
    check_setting(cfg.hsic.eps > 0, "hsic.eps", cfg.hsic.eps, "a positive number")
    check_setting(
        not cfg.hsic.leave_one_out or cfg.hsic.estimator == "cca",
        "hsic.leave_one_out",
        cfg.hsic.leave_one_out,
        "false with hsic.estimator other than cca (the leave-one-out fit is cca's kernel ridge regression)",
    )
    for prefix, opt in (("optim", cfg.optim), ("head", cfg.head), ("backprop", cfg.backprop)):
        check_setting(opt.lr > 0, f"{prefix}.lr", opt.lr, "a positive number")
        check_setting(0 <= opt.momentum < 1, f"{prefix}.momentum", opt.momentum, "a number in [0, 1)")
        check_setting(opt.weight_decay >= 0, f"{prefix}.weight_decay", opt.weight_decay, "a number >= 0")
    for prefix, opt in (("optim", cfg.optim), ("backprop", cfg.backprop)):
        _check_choice(f"{prefix}.schedule", opt.schedule, LR_SCHEDULES)
    _check_positive("head.epochs", cfg.head.epochs, minimum=0)
    _check_positive("head.batch_size", cfg.head.batch_size)
    # HSIC compares samples within a batch: a batch of one has no pairs.
    _check_positive("train.batch_size", cfg.train.batch_size, minimum=2)
    _check_positive("train.epochs", cfg.train.epochs)
    check_setting(
        cfg.train.max_steps is None or cfg.train.max_steps >= 1,
        "train.max_steps",
        cfg.train.max_steps,
        "a number >= 1 or null",
    )
    _check_positive("train.log_every", cfg.train.log_every)
    check_setting(
        2 <= cfg.train.eval_samples <= MAX_EVAL_SAMPLES,
        "train.eval_samples",
        cfg.train.eval_samples,
        f"a number in [2, {MAX_EVAL_SAMPLES}] (each layer builds an N x N kernel of the information plane's batch)",
    )
    _check_positive("train.probe_samples", cfg.train.probe_samples, minimum=0)
    check_setting(0 <= cfg.train.seed <= MAX_SEED, "train.seed", cfg.train.seed, f"an integer in [0, {MAX_SEED}]")
    _check_choice("train.device", cfg.train.device, ("auto", "cpu", "cuda"))
    _check_choice("train.cuda_graphs", cfg.train.cuda_graphs, CUDA_GRAPHS)
    check_setting(
        not (cfg.train.cuda_graphs == "on" and cfg.train.device == "cpu"),
        "train.cuda_graphs",
        cfg.train.cuda_graphs,
        "auto or off with train.device=cpu (CUDA graphs need a CUDA device)",
    )
    _check_positive("train.checkpoint_every", cfg.train.checkpoint_every, minimum=0)
    check_setting(
        cfg.train.checkpoint_seconds >= 0,
        "train.checkpoint_seconds",
        cfg.train.checkpoint_seconds,
        "seconds >= 0 between checkpoints (0: none by time)",
    )
    _check_positive("train.bn_calibration_batches", cfg.train.bn_calibration_batches, minimum=0)
    _check_choice("trainer", cfg.trainer, TRAINERS)
    check_setting(
        cfg.ray.stages is None or cfg.ray.stages >= 1, "ray.stages", cfg.ray.stages, "a number >= 1 or null (auto)"
    )
    check_setting(
        cfg.ray.stages is None or cfg.ray.stages <= cfg.num_hsic_layers,
        "ray.stages",
        cfg.ray.stages,
        f"at most the {cfg.num_hsic_layers} HSIC-trained layers (depth + 2)",
    )
    check_setting(
        cfg.ray.gpus_per_stage is None or cfg.ray.gpus_per_stage >= 0,
        "ray.gpus_per_stage",
        cfg.ray.gpus_per_stage,
        "a number >= 0 (fractions share a GPU) or null (auto)",
    )
    check_setting(cfg.ray.cpus_per_stage > 0, "ray.cpus_per_stage", cfg.ray.cpus_per_stage, "a positive number")
    check_setting(cfg.ray.coordinator_cpus > 0, "ray.coordinator_cpus", cfg.ray.coordinator_cpus, "a positive number")
    _check_choice("ray.strategy", cfg.ray.strategy, STRATEGIES)
    check_setting(
        cfg.ray.max_in_flight is None or cfg.ray.max_in_flight >= 1,
        "ray.max_in_flight",
        cfg.ray.max_in_flight,
        "a number >= 1 or null (2 x stages x batches per call)",
    )
    check_setting(
        cfg.ray.batches_per_call is None or cfg.ray.batches_per_call >= 1,
        "ray.batches_per_call",
        cfg.ray.batches_per_call,
        "a number >= 1 or null (chosen from measured times)",
    )
    if cfg.ray.factors_on is not None:
        _check_choice("ray.factors_on", cfg.ray.factors_on, FACTORS_ON)
    _check_positive("ray.max_recoveries", cfg.ray.max_recoveries, minimum=0)
    check_setting(
        cfg.ray.address is None or is_ray_address(cfg.ray.address),
        "ray.address",
        cfg.ray.address,
        "HOST:PORT of the head (what `ray start --head` prints), ray://HOST:10001, auto, or null",
    )
    check_setting(
        cfg.ray.placement_timeout_s > 0,
        "ray.placement_timeout_s",
        cfg.ray.placement_timeout_s,
        "a positive number of seconds",
    )
    check_setting(
        cfg.output is None or bool(cfg.output.strip()),
        "output",
        cfg.output,
        "a directory path or URI (or null: runs/<preset>-<time>)",
    )
    check_setting(cfg.preset is None or cfg.preset in PRESETS, "preset", cfg.preset, f"one of {', '.join(PRESETS)}")
    return cfg


# --- building, saving, loading ---------------------------------------------------------------------------


def _check_switches(obj: Any, layer: Mapping[str, Any], prefix: str = "") -> None:
    """A yes/no field takes true or false: OmegaConf would also read 2 or "maybe"-like numbers as a bool."""
    for f in dataclasses.fields(obj):
        if f.name not in layer:
            continue
        value, name = layer[f.name], f"{prefix}{f.name}"
        if dataclasses.is_dataclass(getattr(obj, f.name)) and isinstance(value, Mapping):
            _check_switches(getattr(obj, f.name), value, f"{name}.")
        elif f.type == "bool" and not isinstance(value, bool) and str(value).lower() not in ("true", "false"):
            raise ConfigError(f"{name}={value!r} is invalid: expected true or false")


def _merge(base: ExperimentConfig, *layers: Mapping[str, Any]) -> ExperimentConfig:
    merged = OmegaConf.structured(base)
    try:
        for layer in layers:
            _check_switches(base, layer)
            merged = OmegaConf.merge(merged, OmegaConf.create(dict(layer)))
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        # OmegaConf names the key and the expected type; keep just that, without its internal context.
        raise ConfigError(str(exc).splitlines()[0] + f" (key: {getattr(exc, 'full_key', '?')})") from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist; pass an existing YAML file to --config")
    try:
        loaded = OmegaConf.to_container(OmegaConf.load(path))
    except Exception as exc:  # yaml's parser errors, UnicodeDecodeError for binary files, ...
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ConfigError(
            f"config file {str(path)!r} is not valid YAML ({type(exc).__name__}: {detail}); fix it or pass "
            "another --config"
        ) from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections, got {type(loaded).__name__}")
    return loaded


# An override value meaning "set this field to null" (None itself means "not given, keep the current value").
NULL = "__null__"


def overrides_to_tree(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """{"model.depth": 10} -> {"model": {"depth": 10}}; None values (flags not given) are dropped."""
    tree: dict[str, Any] = {}
    for dotted, value in overrides.items():
        if value is None:
            continue
        node = tree
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = None if value == NULL else value
    return tree


def build_config(
    preset: str | None = None,
    yaml_path: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    default_preset: str | None = None,
) -> ExperimentConfig:
    """preset -> YAML file -> overrides (dotted keys), then validate once.

    The preset is the overrides' `preset`, else `preset`, else the file's `preset:`, else `default_preset`.
    It is built for the dataset (and data.family) the file or overrides ask for, since its beta depends on it.
    """
    file_tree = read_yaml(yaml_path) if yaml_path else {}
    override_tree = overrides_to_tree(overrides or {})
    preset = override_tree.pop("preset", None) or preset or file_tree.pop("preset", None) or default_preset
    file_tree.pop("preset", None)
    if preset is not None and preset not in PRESETS:
        raise ConfigError(f"preset={preset!r} is invalid: expected one of {', '.join(PRESETS)}")

    def data_setting(key: str) -> Any:
        return override_tree.get("data", {}).get(key) or file_tree.get("data", {}).get(key)

    source = data_setting("source") or "mnist-sample"
    base = PRESETS[preset](source, data_setting("family")) if preset else ExperimentConfig()
    return validate(_merge(base, file_tree, override_tree))


def save_config(cfg: ExperimentConfig) -> str:
    """The config as YAML text (what runs and checkpoints store)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def config_from_yaml_text(text: str) -> ExperimentConfig:
    """Rebuild a config saved by `save_config`."""
    return validate(_merge(ExperimentConfig(), OmegaConf.to_container(OmegaConf.create(text))))

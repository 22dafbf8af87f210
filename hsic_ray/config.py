"""Typed run configuration: dataclasses whose fields carry their help text, validation, building from a
preset (`hsic_ray.presets`), YAML files and command-line overrides, and saving.

A config is built once at the edge (`build_config`): preset, then YAML file, then overrides, then one
validation pass whose errors name the field and what it accepts. The result is plain data: it is saved
with every run and checkpoint and rebuilt from that file (`config_from_yaml_text`).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from hsic_ray.errors import ConfigError

ARCHITECTURES = ("mlp", "resconv", "conv")
ACTIVATIONS = ("relu", "tanh", "sigmoid", "elu")
INITS = ("default", "orthogonal", "identity")
ESTIMATORS = ("cca", "biased", "cka", "plausible")  # hsic_ray.hsic.make_estimator
TRAINERS = ("local", "ray")
CUDA_GRAPHS = ("auto", "on", "off")
DEVICES = ("auto", "cpu", "cuda")
LR_SCHEDULES = ("constant", "cosine")  # hsic_ray.schedule
STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
FACTORS_ON = ("coordinator", "first_stage")  # hsic_ray.distributed.ray_pipeline
DATASET_NAMES = ("mnist-sample", "mnist", "fashion-mnist", "cifar10")
DATASET_PREFIXES = ("npz:", "parquet:")
# Which of the authors' per-dataset settings (the presets' beta) a run gets; a file source names its own.
DATASET_FAMILIES = ("mnist", "fashion-mnist", "cifar10")


def documented(default: Any, help: str, **flag: Any) -> Any:
    """A config field with its help text, written once: the jobs' flags take their help, choices and type
    from here (`hsic_ray.cli.add_config_flags`), and `validate` checks `choices`. `flag` may also give a
    `metavar`, or a `null_word` the flag takes for null."""
    if callable(default):
        return field(default_factory=default, metadata={"help": help, **flag})
    return field(default=default, metadata={"help": help, **flag})


@dataclass
class DataConfig:
    source: str = documented(
        "mnist-sample",
        "mnist-sample (bundled 10,000 digits), mnist, fashion-mnist, cifar10 (torchvision), npz:PATH, parquet:URI",
        metavar="SOURCE",
    )
    root: str = documented(
        "~/.cache/hsic-ray/data", "where torchvision datasets are stored and downloaded to", metavar="DIR"
    )
    download: bool = documented(True, "let torchvision download a missing dataset (needs network access)")
    test_fraction: float = documented(0.2, "held-out share of mnist-sample (the file has no split of its own)")
    split_seed: int = documented(1234, "seed of mnist-sample's split, independent of the training seed")
    family: str | None = documented(
        None,
        "whose per-dataset preset settings (beta) apply; default: inferred from a named source, mnist for npz: "
        "and parquet: files",
        choices=DATASET_FAMILIES,
    )


@dataclass
class ModelConfig:
    arch: str = documented(
        "mlp",
        "mlp, resconv (conv, residual blocks, dense to last_width), or conv (plain 3x3 convs in three stages, no "
        "skip connections, average pooling to model.pool_grid, dense to last_width)",
        choices=ARCHITECTURES,
    )
    depth: int = documented(
        5,
        "hidden width x width blocks (mlp), residual blocks (resconv) or 3x3 conv layers after the stem (conv); the "
        "net has depth + 2 HSIC layers",
    )
    width: int = documented(1024, "hidden width (mlp), channels (resconv), or the first stage's channels (conv)")
    skips: bool = documented(
        False,
        "conv only: every conv layer after the stem adds its input to its output (through a 1x1 projection where "
        "the size changes): the same net with skip connections, backprop's usual fix for depth",
    )
    pool_grid: int = documented(
        1,
        "conv only: the last conv map is average-pooled to a pool_grid x pool_grid grid before the dense last layer; "
        "1 is global average pooling (He et al.'s net), larger keeps where in the image a feature was",
    )
    last_width: int = documented(10, "output width of the last HSIC-trained layer (what the format head reads)")
    activation: str = documented("relu", "the hidden layers' activation", choices=ACTIVATIONS)
    init: str = documented(
        "default",
        "default (PyTorch's), orthogonal (orthonormal weights, zero biases: with an invertible activation an "
        "untrained layer loses no information), or identity (orthogonal, but every layer that keeps its input's "
        "shape starts as the identity map: a deep plain net starts as a shallow one)",
        choices=INITS,
    )


@dataclass
class HSICConfig:
    estimator: str = documented(
        "cca",
        "cca (the paper's nHSIC), biased, cka, or plausible (pHSIC: HSIC(Z, Z) replaces HSIC(Z, X); beta is its gamma)",
        choices=ESTIMATORS,
    )
    sigma: float | None = documented(
        6.0,
        "Gaussian kernel bandwidth, scaled by each variable's dimension; median (null): the median heuristic",
        null_word="median",
    )
    beta: float = documented(200.0, "weight of nHSIC(Z, Y) in each layer's loss")
    eps: float = documented(1e-5, "the cca regulariser; raise it if a kernel system fails in float64")
    # Extensions beyond the paper (hsic_ray.objective, hsic_ray.stage_step), off unless set; off in the
    # paper_* presets (deep_mlp sets leave_one_out). docs/configuration.md says what each is for.
    layer_sigma: float | None = documented(
        None, "extension: a kernel width for the layers' outputs Z of its own (null: sigma, as in the paper)"
    )
    input_weight_first: float = documented(
        1.0,
        "extension: weight on nHSIC(Z, X) at the first HSIC layer, rising linearly to 1 at the last (1: the "
        "paper's objective; below 0: early layers keep information about the input)",
    )
    lr_scale_last: float = documented(
        1.0,
        "extension: learning-rate multiplier of the last HSIC layer, falling geometrically from 1 at the first",
    )
    leave_one_out: bool = documented(
        False,
        "extension: score nHSIC as a leave-one-out fit, so that no layer gains by fitting only its own batch "
        "(needs estimator cca)",
    )
    max_kernel_features: int | None = documented(
        None,
        "extension: a conv layer's output wider than this is average-pooled over space to fit before its kernel is "
        "taken (the loss's view only, not the forward); null (full): the whole output, as in the paper",
        null_word="full",
    )


@dataclass
class OptimConfig:
    """SGD for every HSIC-trained layer (or, as `backprop`, the baseline's); each layer keeps its own optimizer
    (and momentum) for the run."""

    lr: float = documented(1e-3, "SGD learning rate")
    momentum: float = documented(0.9, "SGD momentum, in [0, 1)")
    weight_decay: float = documented(1e-3, "SGD weight decay (not scaled by the schedule)")
    schedule: str = documented(
        "constant", "constant, or cosine: the lr annealed to 0 over the run (hsic_ray.schedule)", choices=LR_SCHEDULES
    )


@dataclass
class HeadConfig:
    """The linear format head: SGD + cross-entropy on the frozen network's output."""

    epochs: int = documented(5, "epochs of the format head on the frozen network")
    lr: float = documented(0.005, "SGD learning rate of the format head")
    momentum: float = documented(0.9, "SGD momentum of the format head")
    weight_decay: float = documented(0.0, "SGD weight decay of the format head")
    batch_size: int = documented(256, "the format head's batch size")
    concurrent: bool = documented(False, "also train the head on detached outputs while the HSIC layers train")


@dataclass
class TrainConfig:
    batch_size: int = documented(256, "samples per batch, >= 2 (HSIC compares samples within a batch)")
    epochs: int = documented(5, "passes over the training split")
    max_steps: int | None = documented(None, "stop training after this many steps")
    seed: int = documented(1234, "seed of the weights and the batch order")
    log_every: int = documented(10, "steps between progress lines and metrics.jsonl records")
    eval_samples: int = documented(512, "size of the fixed batch the information plane is measured on")
    probe_samples: int = documented(
        2000,
        "linear probes of every layer each epoch on this many training samples and half as many test samples, "
        "and at the end (train.final_probe_samples; hsic_ray.probes); 0: no probes",
    )
    probe_features: int = documented(
        2048,
        "a probe reads at most this many features of a layer (wider conv maps average-pooled, other outputs "
        "randomly projected; hsic_ray.probes): its fit grows with the square of what it reads",
    )
    final_probe_samples: int = documented(
        10_000,
        "the probes at the end of the run are fitted on this many training samples (all, where the split is "
        "smaller) and scored on the whole test split",
    )
    readout_samples: int | None = documented(
        10_000,
        "the readouts between epochs (least squares and unformatted: what a sweep's trials report) are fitted on "
        "this many training samples (all, where the split is smaller; null: all) and scored on the whole test split",
    )
    monitor_every: int | None = documented(
        None,
        "epochs between the information plane, the linear probes and the BatchNorm recalibration, from epoch 0 "
        "(before training); auto (null): after any epoch where they stay within train.monitor_share of the "
        "training time so far. The last epoch always has them; a sweep's trial reads the plane every epoch (it "
        "reports it)",
        null_word="auto",
    )
    monitor_share: float = documented(
        0.05, "with train.monitor_every auto: the share of the training time the per-epoch monitors may take"
    )
    plot_seconds: float = documented(
        60.0,
        "information_plane.png and probes.png are redrawn after an epoch once this long has passed since they "
        "last were, and always at the end of the run (0: only at the end)",
    )
    device: str = documented(
        "auto", "the in-process trainer's device (a Ray stage uses the GPU its bundle gives it)", choices=DEVICES
    )
    # Time, not steps, makes the default suit any hardware: a step's time differs by orders of magnitude
    # between a CPU stage and a GPU one, and each checkpoint waits for every batch in flight.
    checkpoint_seconds: float = documented(
        60.0, "a checkpoint once this long has passed since the last (0: none by time)"
    )
    checkpoint_every: int = documented(0, "also a checkpoint at every multiple of this many steps (0: none by steps)")
    bn_calibration_batches: int = documented(
        20,
        "training batches BatchNorm statistics are recomputed on after each epoch, with its final weights (0: keep "
        "the moving averages, which lag behind the weights)",
    )
    cuda_graphs: str = documented(
        "auto", "each stage's step as one CUDA graph: auto (on CUDA devices), on (required), off", choices=CUDA_GRAPHS
    )
    factor_group: int | None = documented(
        None,
        "training batches whose kernel factors (each batch's input and label solves) are computed together, in "
        "one batched call: for a GPU, which one batch's small solves leave mostly idle; auto (null): up to 8 on a "
        "GPU (fewer for batches over 1024 samples), 1 on a CPU, where batching saves no arithmetic",
        null_word="auto",
    )
    tensorboard: bool = documented(
        False, "TensorBoard event files in OUTPUT/tensorboard/ (pip install 'hsic-ray[tensorboard]')"
    )


@dataclass
class RayConfig:
    """How `--trainer ray` lays the layers out as stage actors and feeds them."""

    address: str | None = documented(
        None,
        "cluster to join: HOST:PORT (what `ray start --head` prints), ray://HOST:10001, auto; default: "
        "RAY_ADDRESS, a running local cluster, or a new one",
    )
    stages: int | None = documented(
        None, "stage actors; default: one per GPU when the cluster has GPUs, else one per CPU"
    )
    gpus_per_stage: float | None = documented(
        None, "GPUs per stage, fractions share a GPU; default: 1 when the cluster has GPUs, else 0"
    )
    cpus_per_stage: float = documented(1.0, "CPUs (and torch threads) per stage")
    coordinator_cpus: float = documented(1.0, "CPUs of the coordinator's bundle")
    strategy: str = documented(
        "PACK", "placement group strategy (STRICT_SPREAD: one stage per node)", choices=STRATEGIES
    )
    max_in_flight: int | None = documented(
        None, "batches submitted and not finished; default: 2 x stages x batches per call"
    )
    # Chosen so that Ray's cost per call stays under a tenth of the call's compute
    # (hsic_ray.distributed.batches_per_call.choose_batches_per_call).
    batches_per_call: int | None = documented(
        None,
        "consecutive batches a stage takes per actor call (results equal one call per batch); default: chosen "
        "from the first groups' measured times",
    )
    # None: first_stage when stages have GPUs, where the coordinator's CPU would bound the pipeline.
    factors_on: str | None = documented(
        None,
        "where each batch's kernel factors are computed, once for every stage: coordinator (its CPU, in a "
        "thread) or first_stage (its device, in its step call); default: first_stage when stages have GPUs, "
        "else coordinator",
        choices=FACTORS_ON,
    )
    max_recoveries: int = documented(10, "stage actors recreated after failures before the run gives up")
    placement_timeout_s: float = documented(120.0, "seconds to wait for a placement group or a recreated stage")
    ship_package: bool = documented(
        True,
        "on an existing cluster, ship this hsic_ray package to the workers (runtime_env py_modules); false: use "
        "the nodes' installation",
    )


@dataclass
class ExperimentConfig:
    preset: str | None = documented(None, "the named starting config (hsic_ray.presets)")
    trainer: str = documented(
        "ray", "ray: stage actors on a Ray cluster; local: every layer in this process", choices=TRAINERS
    )
    output: str | None = documented(
        None,
        "run directory, a local path or pyarrow URI; default: runs/<preset>-hsic-<time> (-backprop- for the "
        "baseline, -smoke- with --smoke-test)",
        metavar="DIR",
    )
    data: DataConfig = documented(DataConfig, "the data")
    model: ModelConfig = documented(ModelConfig, "the network")
    hsic: HSICConfig = documented(HSICConfig, "the HSIC objective")
    optim: OptimConfig = documented(OptimConfig, "the HSIC layers' SGD")
    head: HeadConfig = documented(HeadConfig, "the format head")
    train: TrainConfig = documented(TrainConfig, "the training run")
    backprop: OptimConfig = documented(
        lambda: OptimConfig(lr=0.05), "the baseline's SGD: the same network and head trained end to end"
    )
    ray: RayConfig = documented(RayConfig, "the Ray pipeline's layout")

    @property
    def num_hsic_layers(self) -> int:
        """Layers trained by HSIC: input block, `depth` hidden blocks, output block."""
        return self.model.depth + 2

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def default_output(preset: str | None, label: str) -> str:
    """Where a run writes when `output` is null: runs/<preset>-<label>-<time>, the label saying what ran
    (hsic, backprop, smoke)."""
    return "runs/" + "-".join(filter(None, (preset, label, time.strftime("%Y%m%d-%H%M%S"))))


def config_field(dotted: str) -> dataclasses.Field:
    """The field a dotted key names (`model.depth`)."""
    obj: Any = ExperimentConfig()
    *sections, name = dotted.split(".")
    for section in sections:
        obj = getattr(obj, section)
    return next(f for f in dataclasses.fields(obj) if f.name == name)


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
    """auto (the cluster `ray start` started on this machine), local (always a new local cluster, as in
    Ray), HOST:PORT or ray://HOST:PORT (what `ray start --head` prints, or Ray Client's address)."""
    if address in ("auto", "local"):
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


def _check_choices(obj: Any, prefix: str = "") -> None:
    """Every field with `choices` holds one of them (or null, where the field may be null)."""
    for f in dataclasses.fields(obj):
        value, name = getattr(obj, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            _check_choices(value, f"{name}.")
        elif "choices" in f.metadata and not (value is None and "None" in str(f.type)):
            _check_choice(name, value, f.metadata["choices"])


def _check_optional(name: str, value: Any, minimum: float, null_means: str) -> None:
    check_setting(value is None or value >= minimum, name, value, f"a number >= {minimum} or null ({null_means})")


def _validate_data(data: DataConfig) -> None:
    check_setting(
        data.source in DATASET_NAMES or (data.source.startswith(DATASET_PREFIXES) and len(data.source) > 4),
        "data.source",
        data.source,
        f"one of {', '.join(DATASET_NAMES)}, npz:PATH or parquet:URI",
    )
    dataset_family(data.source, data.family)
    check_setting(
        0 <= data.split_seed <= MAX_SEED, "data.split_seed", data.split_seed, f"an integer in [0, {MAX_SEED}]"
    )
    check_setting(0.0 < data.test_fraction < 1.0, "data.test_fraction", data.test_fraction, "a fraction in (0, 1)")


def _validate_model(model: ModelConfig) -> None:
    _check_positive("model.depth", model.depth)
    _check_positive("model.width", model.width)
    _check_positive("model.last_width", model.last_width)
    check_setting(not model.skips or model.arch == "conv", "model.skips", model.skips, "false unless model.arch=conv")
    check_setting(
        model.pool_grid == 1 or (model.arch == "conv" and model.pool_grid > 1),
        "model.pool_grid",
        model.pool_grid,
        "a positive integer, and 1 unless model.arch=conv",
    )


def _validate_hsic(hsic: HSICConfig) -> None:
    check_setting(
        hsic.sigma is None or hsic.sigma > 0, "hsic.sigma", hsic.sigma, "a positive number or null (median heuristic)"
    )
    check_setting(
        hsic.layer_sigma is None or hsic.layer_sigma > 0,
        "hsic.layer_sigma",
        hsic.layer_sigma,
        "a positive number or null (the same as hsic.sigma)",
    )
    check_setting(hsic.beta >= 0, "hsic.beta", hsic.beta, "a number >= 0")
    check_setting(hsic.lr_scale_last > 0, "hsic.lr_scale_last", hsic.lr_scale_last, "a positive number")
    check_setting(hsic.eps > 0, "hsic.eps", hsic.eps, "a positive number")
    check_setting(
        hsic.max_kernel_features is None or hsic.max_kernel_features >= 1,
        "hsic.max_kernel_features",
        hsic.max_kernel_features,
        "a positive integer or null (kernels on the full outputs)",
    )
    check_setting(
        not hsic.leave_one_out or hsic.estimator == "cca",
        "hsic.leave_one_out",
        hsic.leave_one_out,
        "false with hsic.estimator other than cca (the leave-one-out fit is cca's kernel ridge regression)",
    )


# No SGD learning rate of these networks is sane at or above this: --lr 1e10 overflows in the first epoch, and a
# head lr of 1e10 leaves the head's loss at 1e9. The presets' rates lie orders of magnitude below.
MAX_LR = 10.0


def _validate_sgd(prefix: str, opt: OptimConfig | HeadConfig) -> None:
    check_setting(0 < opt.lr < MAX_LR, f"{prefix}.lr", opt.lr, f"a positive number below {MAX_LR:g}")
    check_setting(0 <= opt.momentum < 1, f"{prefix}.momentum", opt.momentum, "a number in [0, 1)")
    check_setting(opt.weight_decay >= 0, f"{prefix}.weight_decay", opt.weight_decay, "a number >= 0")


def _validate_train(train: TrainConfig) -> None:
    # HSIC compares samples within a batch: a batch of one has no pairs.
    _check_positive("train.batch_size", train.batch_size, minimum=2)
    _check_positive("train.epochs", train.epochs)
    check_setting(
        train.max_steps is None or train.max_steps >= 1, "train.max_steps", train.max_steps, "a number >= 1 or null"
    )
    _check_positive("train.log_every", train.log_every)
    check_setting(
        2 <= train.eval_samples <= MAX_EVAL_SAMPLES,
        "train.eval_samples",
        train.eval_samples,
        f"a number in [2, {MAX_EVAL_SAMPLES}] (each layer builds an N x N kernel of the information plane's batch)",
    )
    _check_positive("train.probe_samples", train.probe_samples, minimum=0)
    _check_positive("train.plot_seconds", train.plot_seconds, minimum=0)
    _check_optional("train.monitor_every", train.monitor_every, 1, "auto")
    check_setting(0 < train.monitor_share <= 1, "train.monitor_share", train.monitor_share, "a number in (0, 1]")
    _check_positive("train.final_probe_samples", train.final_probe_samples, minimum=2)
    _check_positive("train.probe_features", train.probe_features)
    _check_optional("train.readout_samples", train.readout_samples, 2, "every training sample")
    _check_optional("train.factor_group", train.factor_group, 1, "auto")
    check_setting(0 <= train.seed <= MAX_SEED, "train.seed", train.seed, f"an integer in [0, {MAX_SEED}]")
    check_setting(
        not (train.cuda_graphs == "on" and train.device == "cpu"),
        "train.cuda_graphs",
        train.cuda_graphs,
        "auto or off with train.device=cpu (CUDA graphs need a CUDA device)",
    )
    _check_positive("train.checkpoint_every", train.checkpoint_every, minimum=0)
    check_setting(
        train.checkpoint_seconds >= 0,
        "train.checkpoint_seconds",
        train.checkpoint_seconds,
        "seconds >= 0 between checkpoints (0: none by time)",
    )
    _check_positive("train.bn_calibration_batches", train.bn_calibration_batches, minimum=0)


def _validate_ray(ray: RayConfig, hsic_layers: int) -> None:
    _check_optional("ray.stages", ray.stages, 1, "auto")
    check_setting(
        ray.stages is None or ray.stages <= hsic_layers,
        "ray.stages",
        ray.stages,
        f"at most the {hsic_layers} HSIC-trained layers (depth + 2)",
    )
    check_setting(
        ray.gpus_per_stage is None or ray.gpus_per_stage >= 0,
        "ray.gpus_per_stage",
        ray.gpus_per_stage,
        "a number >= 0 (fractions share a GPU) or null (auto)",
    )
    check_setting(ray.cpus_per_stage > 0, "ray.cpus_per_stage", ray.cpus_per_stage, "a positive number")
    check_setting(ray.coordinator_cpus > 0, "ray.coordinator_cpus", ray.coordinator_cpus, "a positive number")
    _check_optional("ray.max_in_flight", ray.max_in_flight, 1, "2 x stages x batches per call")
    _check_optional("ray.batches_per_call", ray.batches_per_call, 1, "chosen from measured times")
    _check_positive("ray.max_recoveries", ray.max_recoveries, minimum=0)
    check_setting(
        ray.address is None or is_ray_address(ray.address),
        "ray.address",
        ray.address,
        "HOST:PORT of the head (what `ray start --head` prints), ray://HOST:10001, auto, local, or null",
    )
    check_setting(
        ray.placement_timeout_s > 0, "ray.placement_timeout_s", ray.placement_timeout_s, "a positive number of seconds"
    )


def _presets() -> dict[str, Callable[[str, str | None], ExperimentConfig]]:
    # Imported here: the presets are built from this module's dataclasses.
    from hsic_ray.presets import PRESETS

    return PRESETS


def validate(cfg: ExperimentConfig) -> ExperimentConfig:
    """Check every field once; raise ConfigError naming the first bad one and what it accepts."""
    _check_numbers(cfg)
    _check_choices(cfg)
    _validate_data(cfg.data)
    _validate_model(cfg.model)
    _validate_hsic(cfg.hsic)
    for prefix, opt in (("optim", cfg.optim), ("head", cfg.head), ("backprop", cfg.backprop)):
        _validate_sgd(prefix, opt)
    _check_positive("head.epochs", cfg.head.epochs, minimum=0)
    _check_positive("head.batch_size", cfg.head.batch_size)
    _validate_train(cfg.train)
    _validate_ray(cfg.ray, cfg.num_hsic_layers)
    check_setting(
        cfg.output is None or bool(cfg.output.strip()),
        "output",
        cfg.output,
        "a directory path or URI (or null: runs/<preset>-hsic-<time>)",
    )
    presets = _presets()
    check_setting(cfg.preset is None or cfg.preset in presets, "preset", cfg.preset, f"one of {', '.join(presets)}")
    return cfg


# --- building, saving, loading ---------------------------------------------------------------------------


def _check_switches(obj: Any, layer: Mapping[str, Any], prefix: str = "") -> None:
    """A yes/no field takes true or false: OmegaConf would also read 2 or "maybe"-like numbers as a bool. A
    number field whose flag takes a word for null (--sigma median) takes null, not the word, in a KEY=VALUE
    setting or a config file: OmegaConf would say only that the word is no float."""
    for f in dataclasses.fields(obj):
        if f.name not in layer:
            continue
        value, name = layer[f.name], f"{prefix}{f.name}"
        if dataclasses.is_dataclass(getattr(obj, f.name)) and isinstance(value, Mapping):
            _check_switches(getattr(obj, f.name), value, f"{name}.")
        elif f.type == "bool" and not isinstance(value, bool) and str(value).lower() not in ("true", "false"):
            raise ConfigError(f"{name}={value!r} is invalid: expected true or false")
        elif "null_word" in f.metadata and isinstance(value, str) and value.lower() == f.metadata["null_word"]:
            word = f.metadata["null_word"]
            raise ConfigError(
                f"{name}={value!r} is invalid: {word} is written null in a KEY=VALUE setting or config file "
                f"({name}=null); only a command-line flag takes the word {word}"
            )


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
        problem, mark = getattr(exc, "problem", None), getattr(exc, "problem_mark", None)
        if problem:  # yaml's own words for what is wrong, and where: "found duplicate key depth" at line 3
            detail = problem if mark is None else f"{problem} at line {mark.line + 1}"
            key = problem.removeprefix("found duplicate key ")
            if key != problem:
                where = "" if mark is None else f" (line {mark.line + 1})"
                raise ConfigError(
                    f"config file {str(path)!r} sets {key!r} twice in one section{where}; keep one of them"
                ) from None
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
    presets = _presets()
    if preset is not None and preset not in presets:
        raise ConfigError(f"preset={preset!r} is invalid: expected one of {', '.join(presets)}")

    def data_setting(key: str) -> Any:
        return override_tree.get("data", {}).get(key) or file_tree.get("data", {}).get(key)

    source = data_setting("source") or "mnist-sample"
    base = presets[preset](source, data_setting("family")) if preset else ExperimentConfig()
    return validate(_merge(base, file_tree, override_tree))


def save_config(cfg: ExperimentConfig) -> str:
    """The config as YAML text (what runs and checkpoints store)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def config_from_yaml_text(text: str) -> ExperimentConfig:
    """Rebuild a config saved by `save_config`."""
    return validate(_merge(ExperimentConfig(), OmegaConf.to_container(OmegaConf.create(text))))

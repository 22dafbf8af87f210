"""Command-line pieces the job scripts share: the flags every run has, how flags become config overrides,
and which errors are the user's to fix (one line, exit code 2) rather than bugs (a traceback)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from hsic_ray.config import ACTIVATIONS, DATASET_FAMILIES, INITS, NULL, PRESETS, ExperimentConfig, build_config
from hsic_ray.errors import USER_ERRORS

DEFAULT_PRESET = "deep_mlp"
# Config fields outside the sections, which KEY=VALUE may set too (preset=paper_mlp).
TOP_LEVEL_FIELDS = tuple(
    f.name for f in dataclasses.fields(ExperimentConfig) if f.default_factory is dataclasses.MISSING
)


class JobArgumentParser(argparse.ArgumentParser):
    """argparse with its errors on one line, like every other input error of the jobs."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def run_job(body: Callable[[], int]) -> int:
    """A job script's body; a user error ends it with one line on stderr and exit code 2."""
    try:
        return body()
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def build_run_config(args: argparse.Namespace, *flag_maps: dict[str, str]) -> ExperimentConfig:
    """The run's config from --preset, --config, --smoke-test, the flags and KEY=VALUE settings."""
    return build_config(args.preset, args.config, overrides(args, *flag_maps), default_preset=DEFAULT_PRESET)


# flag dest -> config field, for the flags `add_run_arguments` defines.
RUN_FLAGS = {
    "output": "output",
    "dataset": "data.source",
    "data_family": "data.family",
    "data_root": "data.root",
    "depth": "model.depth",
    "width": "model.width",
    "last_width": "model.last_width",
    "activation": "model.activation",
    "init": "model.init",
    "batch_size": "train.batch_size",
    "epochs": "train.epochs",
    "max_steps": "train.max_steps",
    "seed": "train.seed",
    "log_every": "train.log_every",
    "ray_address": "ray.address",
}


# What --smoke-test sets (flags given beside it still win): a tiny network for a few steps, to check in
# seconds that data, cluster and output work before a long run.
SMOKE_TEST = {
    "model.depth": 1,
    "model.width": 32,
    "train.epochs": 1,
    "train.max_steps": 4,
    "head.epochs": 1,
    "train.eval_samples": 64,
    "train.log_every": 2,
}


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """Preset, config file, output, data, network shape, budget, seed, resume and cluster address."""
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help=f"named starting config (default: the --config file's preset:, else {DEFAULT_PRESET})",
    )
    p.add_argument("--config", metavar="FILE.yaml", help="YAML file of config sections applied over the preset")
    p.add_argument("--output", metavar="DIR", help="run directory (local path or pyarrow URI)")
    p.add_argument(
        "--dataset",
        metavar="SOURCE",
        help="mnist-sample (bundled), mnist, fashion-mnist, cifar10, npz:PATH, parquet:URI",
    )
    add_data_family_argument(p)
    p.add_argument("--data-root", metavar="DIR", help="where torchvision datasets are stored / downloaded")
    p.add_argument("--depth", type=int, help="hidden width x width blocks (depth 5 = 7 layers)")
    p.add_argument("--width", type=int, help="hidden width (channels for paper_resconv)")
    p.add_argument("--last-width", type=int, help="width of the network's last layer (before the format head)")
    p.add_argument("--activation", choices=ACTIVATIONS)
    p.add_argument("--init", choices=INITS, help="weight initialisation (orthogonal: no information lost at the start)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--epochs", type=int)
    p.add_argument("--max-steps", type=int, help="stop training after this many steps")
    p.add_argument("--seed", type=int)
    p.add_argument("--log-every", type=int, help="steps between progress lines")
    p.add_argument("--resume", action="store_true", help="continue the interrupted run in --output (required to exist)")
    p.add_argument(
        "--smoke-test", action="store_true", help="a tiny network for a few steps: checks the setup in seconds"
    )
    p.add_argument(
        "settings",
        nargs="*",
        type=setting,
        metavar="KEY=VALUE",
        help="any config field, applied after the flags, e.g. hsic.eps=1e-4 train.cuda_graphs=off",
    )
    p.add_argument(
        "--ray-address", help="cluster to join (default: RAY_ADDRESS, a running local cluster, or a new one)"
    )


def add_data_family_argument(p: argparse.ArgumentParser) -> None:
    """--data-family: whose per-dataset settings the presets apply to an npz: or parquet: source."""
    p.add_argument(
        "--data-family",
        choices=DATASET_FAMILIES,
        help="whose settings (beta) the preset applies to "
        "the data (default: inferred from a named --dataset, mnist for npz: and parquet: files)",
    )


def setting(text: str) -> tuple[str, Any]:
    """argparse type of a KEY=VALUE config override: a dotted key and one value (null sets a field to null)."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or ("." not in key and key not in TOP_LEVEL_FIELDS):
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE with a dotted config key, e.g. hsic.eps=1e-4")
    parsed = _scalar(value.strip())
    return key, NULL if parsed is None else parsed


def grid_axis(text: str) -> tuple[str, list[Any]]:
    """argparse type of a sweep axis, KEY=V1,V2,...: a dotted config key and the values to try."""
    key, sep, values = text.partition("=")
    key = key.strip()
    if not sep or "." not in key or not values.strip():
        raise argparse.ArgumentTypeError(
            f"{text!r} is not KEY=V1,V2,... with a dotted config key, e.g. model.activation=relu,elu"
        )
    return key, [_scalar(value.strip()) for value in values.split(",")]


def _scalar(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"null": None, "true": True, "false": False}.get(text.lower(), text)


def overrides(args: argparse.Namespace, *flag_maps: dict[str, str]) -> dict[str, Any]:
    """Dotted config overrides: SMOKE_TEST with --smoke-test, then the flags, then KEY=VALUE settings;
    flags left unset (None) keep the preset / file value."""
    flags = {field: getattr(args, flag) for flag_map in flag_maps for flag, field in flag_map.items()}
    smoke = SMOKE_TEST if getattr(args, "smoke_test", False) else {}
    given = {field: value for field, value in flags.items() if value is not None}
    return {**smoke, **given, **dict(getattr(args, "settings", None) or [])}

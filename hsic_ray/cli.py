"""Command-line pieces the job scripts share: which config fields each job takes as flags (their type,
choices and help come from the config's fields), how flags become config overrides, and which errors are the
user's to fix (one line, exit code 2) rather than bugs (a traceback), and how a job's process ends."""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import difflib
import logging
import os
import sys
import threading
from collections.abc import Callable
from typing import Any, NoReturn

from hsic_ray.config import NULL, ExperimentConfig, build_config, config_field, default_output
from hsic_ray.errors import USER_ERRORS, Interrupted
from hsic_ray.interrupt import signals_stop_the_run
from hsic_ray.presets import PRESETS, SMOKE_TEST

DEFAULT_PRESET = "deep_mlp"
# Config fields outside the sections, which KEY=VALUE may set too (preset=paper_mlp).
TOP_LEVEL_FIELDS = tuple(
    f.name for f in dataclasses.fields(ExperimentConfig) if f.default_factory is dataclasses.MISSING
)

# Which config fields each job takes as flags: flag dest -> dotted field. A flag is --DEST with dashes; its
# type, choices and help come from the field (`hsic_ray.config.documented`).
RUN_FLAGS = {  # every run: train_deep.py and train_backprop.py
    "output": "output",
    "dataset": "data.source",
    "data_family": "data.family",
    "data_root": "data.root",
    "arch": "model.arch",
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
HSIC_FLAGS = {  # train_deep.py
    "trainer": "trainer",
    "estimator": "hsic.estimator",
    "sigma": "hsic.sigma",
    "beta": "hsic.beta",
    "lr": "optim.lr",
    "lr_schedule": "optim.schedule",
    "device": "train.device",
    "cuda_graphs": "train.cuda_graphs",
    "format_epochs": "head.epochs",
    "format_lr": "head.lr",
    "concurrent_head": "head.concurrent",
    "checkpoint_every": "train.checkpoint_every",
    "checkpoint_seconds": "train.checkpoint_seconds",
    "tensorboard": "train.tensorboard",
    "monitor_every": "train.monitor_every",
    "stages": "ray.stages",
    "gpus_per_stage": "ray.gpus_per_stage",
    "cpus_per_stage": "ray.cpus_per_stage",
    "strategy": "ray.strategy",
    "max_in_flight": "ray.max_in_flight",
    "batches_per_call": "ray.batches_per_call",
    "factors_on": "ray.factors_on",
}
BACKPROP_FLAGS = {"lr": "backprop.lr", "lr_schedule": "backprop.schedule"}  # train_backprop.py
# sweep_depth.py: settings every trial shares, and grids (a list of values each).
SWEEP_FLAGS = {
    "dataset": "data.source",
    "data_family": "data.family",
    "width": "model.width",
    "epochs": "train.epochs",
    "batch_size": "train.batch_size",
    "max_steps": "train.max_steps",
}
SWEEP_GRID_FLAGS = {"betas": "hsic.beta", "sigmas": "hsic.sigma", "lrs": "optim.lr", "estimators": "hsic.estimator"}


class JobArgumentParser(argparse.ArgumentParser):
    """argparse with its errors on one line, like every other input error of the jobs."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message}{self._flag_hint(message)} (see {self.prog} --help)\n")

    def _flag_hint(self, message: str) -> str:
        """ "; did you mean --depth?" after argparse's "unrecognized arguments: --detph", naming the closest flag."""
        if not message.startswith("unrecognized arguments: "):
            return ""
        flags = [s for action in self._actions for s in action.option_strings if s.startswith("--")]
        for word in message.removeprefix("unrecognized arguments: ").split():
            if word.startswith("-"):
                close = difflib.get_close_matches(word.partition("=")[0], flags, n=1)
                if close:
                    return f"; did you mean {close[0]}?"
        return ""

    def parse_intermixed_args(self, args: Any = None, namespace: Any = None) -> argparse.Namespace:
        """As argparse's, but an unknown flag is named before a KEY=VALUE setting is checked: in `--detph 5` the
        error is the flag, not that 5 is no KEY=VALUE (argparse takes 5 for a setting, then names the flag)."""
        return self._check_settings(super().parse_intermixed_args(args, namespace))

    def parse_args(self, args: Any = None, namespace: Any = None) -> argparse.Namespace:
        return self._check_settings(super().parse_args(args, namespace))

    def _check_settings(self, parsed: argparse.Namespace) -> argparse.Namespace:
        for item in getattr(parsed, "settings", None) or []:
            if isinstance(item, _BadSetting):
                self.error(f"argument KEY=VALUE: {item.message}")
        return parsed


class _JobLogFormatter(logging.Formatter):
    """`HH:MM:SS message`; warnings and errors name their level (`HH:MM:SS WARNING message`)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        level = f"{record.levelname} " if record.levelno >= logging.WARNING else ""
        return f"{self.formatTime(record, self.datefmt)} {level}{record.message}"


def setup_logging() -> None:
    """The jobs' log lines on stderr, with the time: this package's from INFO up, other libraries' (torch,
    Ray, Tune) from WARNING up. Their INFO notes are theirs to debug with: torch's, for one, prints its tensor
    caches' statistics at exit once its compiler has been imported."""
    handler = logging.StreamHandler()
    handler.setFormatter(_JobLogFormatter(datefmt="%H:%M:%S"))
    logging.basicConfig(level=logging.WARNING, handlers=[handler])
    logging.getLogger("hsic_ray").setLevel(logging.INFO)


def run_job(body: Callable[[], int]) -> int:
    """A job script's body; a user error ends it with one line on stderr and exit code 2. SIGINT and SIGTERM
    stop it (at the training loop's next safe point, or at once elsewhere and at a second signal) with one
    line and exit code 130 or 143 (`hsic_ray.interrupt`)."""
    try:
        with signals_stop_the_run():
            return body()
    except USER_ERRORS as exc:
        print(f"error: {user_message(exc)}", file=sys.stderr)
        return 2
    except Interrupted as exc:
        print(exc, file=sys.stderr)
        return 128 + exc.signum


def exit_job(code: int) -> NoReturn:
    """End a job's process with `code` as the interpreter would (its other threads joined, Ray shut down, its
    exit handlers run, the streams flushed), less the teardown of every module, which after torch's import
    takes the best part of a second or two and that the user would wait for."""
    # What CPython's own exit runs first, in its order: threading's exit hooks (they stop idle executor
    # threads, which would never end otherwise), a join of the threads left, then the atexit handlers.
    threading._shutdown()
    # Ray's own exit handler would shut it down after half a second's wait for its workers' last log lines,
    # which a job that has printed its result does not need, and a second more for its autoscaler monitor.
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        from hsic_ray.distributed.shutdown import shutdown

        shutdown()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def user_message(exc: BaseException) -> str:
    """An error's own words. One raised in a Ray task or actor (a stage's full disk) reaches the driver as a
    RayTaskError that is also an instance of the error, its text led by the remote traceback; its `cause` is
    the error as raised."""
    cause = getattr(exc, "cause", None)
    return str(cause if isinstance(cause, BaseException) else exc)


def build_run_config(args: argparse.Namespace, *flag_maps: dict[str, str]) -> ExperimentConfig:
    """The run's config from --preset, --config, --smoke-test, the flags and KEY=VALUE settings."""
    cfg = build_config(args.preset, args.config, overrides(args, *flag_maps), default_preset=DEFAULT_PRESET)
    if getattr(args, "smoke_test", False) and cfg.output is None:
        cfg.output = default_output(cfg.preset, "smoke")
    return cfg


def accuracy_text(value: float | None) -> str:
    """An accuracy (%) as a job prints it: two decimals, or n/a where the run has none."""
    return "n/a" if value is None else f"{value:.2f}"


def add_run_arguments(p: argparse.ArgumentParser, *job_flags: dict[str, str]) -> None:
    """Preset, config file, resume, smoke test, KEY=VALUE settings, and the flags of RUN_FLAGS and `job_flags`."""
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help=f"named starting config (default: the --config file's preset:, else {DEFAULT_PRESET})",
    )
    p.add_argument("--config", metavar="FILE.yaml", help="YAML file of config sections applied over the preset")
    p.add_argument("--resume", action="store_true", help="continue the interrupted run in --output (required to exist)")
    p.add_argument(
        "--smoke-test", action="store_true", help="a tiny network for a few steps: checks the setup in seconds"
    )
    p.add_argument(
        "settings",
        nargs="*",
        type=_setting_checked_later,
        metavar="KEY=VALUE",
        help="any config field, applied after the flags, e.g. hsic.eps=1e-4 train.cuda_graphs=off",
    )
    add_config_flags(p, RUN_FLAGS, *job_flags)


def add_config_flags(p: argparse.ArgumentParser, *flag_maps: dict[str, str], grid: bool = False) -> None:
    """A flag per entry of `flag_maps`, its type, choices and help taken from the config field it sets,
    grouped by config section. `grid`: each flag takes a list of values to sweep over."""
    groups: dict[str, Any] = {}
    for flag_map in flag_maps:
        for dest, dotted in flag_map.items():
            section = dotted.rpartition(".")[0] or "run"
            if section not in groups:
                groups[section] = p.add_argument_group(f"{section} settings")
            spec = _flag_spec(dotted, grid)
            groups[section].add_argument(f"--{dest.replace('_', '-')}", dest=dest, **spec)


def _flag_spec(dotted: str, grid: bool) -> dict[str, Any]:
    """add_argument's keywords for the flag of config field `dotted`."""
    f = config_field(dotted)
    meta, kind = f.metadata, str(f.type)
    spec: dict[str, Any] = {"help": f"{'grid over ' if grid else ''}{meta['help']} ({dotted})".replace("%", "%%")}
    if kind == "bool":
        return {**spec, "action": "store_true", "default": None}
    spec.update({key: meta[key] for key in ("choices", "metavar") if key in meta})
    number = {"int": int, "float": float}.get(kind.split(" ")[0])
    if number is not None:
        spec["type"] = number if grid or "null_word" not in meta else _number_or_null(number, meta["null_word"])
    return {**spec, "nargs": "+"} if grid else spec


def _number_or_null(number: type, word: str) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        return NULL if text == word else number(text)

    parse.__name__ = f"{number.__name__} or {word!r}"  # argparse names the type in its error
    return parse


def setting(text: str) -> tuple[str, Any]:
    """argparse type of a KEY=VALUE config override: a dotted key and one value (null sets a field to null)."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or ("." not in key and key not in TOP_LEVEL_FIELDS):
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE with a dotted config key, e.g. hsic.eps=1e-4")
    parsed = _scalar(value.strip())
    return key, NULL if parsed is None else parsed


class _BadSetting(str):
    """A KEY=VALUE argument that is none, kept with its error until argparse has named any unknown flag."""

    message: str


def _setting_checked_later(text: str) -> tuple[str, Any] | _BadSetting:
    """`setting`, its error reported by JobArgumentParser.parse_intermixed_args after the unknown flags."""
    try:
        return setting(text)
    except argparse.ArgumentTypeError as exc:
        bad = _BadSetting(text)
        bad.message = str(exc)
        return bad


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


def flag_overrides(args: argparse.Namespace, *flag_maps: dict[str, str]) -> dict[str, Any]:
    """The dotted config overrides of the flags given; flags left unset (None) keep the preset / file value."""
    flags = {field: getattr(args, dest) for flag_map in flag_maps for dest, field in flag_map.items()}
    return {field: value for field, value in flags.items() if value is not None}


def overrides(args: argparse.Namespace, *flag_maps: dict[str, str]) -> dict[str, Any]:
    """Dotted config overrides: SMOKE_TEST with --smoke-test, then the flags, then KEY=VALUE settings."""
    smoke = SMOKE_TEST if getattr(args, "smoke_test", False) else {}
    return {**smoke, **flag_overrides(args, *flag_maps), **dict(getattr(args, "settings", None) or [])}

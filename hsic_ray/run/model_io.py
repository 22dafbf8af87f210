"""`model.pt`: a finished run's trained network and format head, and `load_model` to get them back.

The file holds state dicts plus the config that builds the modules, so loading needs neither Ray nor the
run's checkpoints:

    {"format": 1, "method": "hsic" | "backprop", "config": <config.yaml text>, "input_shape": [C, H, W],
     "num_classes": K, "network": LayerwiseNet state dict, "head": format head state dict}
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from typing import Any

import pyarrow.fs as pafs
import torch
from torch import nn

from hsic_ray.config import ExperimentConfig, config_from_yaml_text, save_config
from hsic_ray.errors import ConfigError, ModelFileError, ModelInputError
from hsic_ray.models import build_head, build_network
from hsic_ray.run.claim import SWEEP_TRIALS
from hsic_ray.run.location import open_location, resolve_location

MODEL_FILE = "model.pt"
FORMAT = 1


class Classifier(nn.Module):
    """Images -> class logits: the HSIC-trained (or backprop-trained) network, then the format head.

    Takes what the datasets give before training: N x C x H x W floats in [0, 1], or uint8 pixels, which are
    divided by 255 exactly as the training data pipeline does (`hsic_ray.data.to_tensor`; no other
    normalisation is applied in training, the first layer flattens).
    """

    def __init__(
        self,
        network: nn.Module,
        head: nn.Module,
        method: str,
        config: ExperimentConfig,
        input_shape: Sequence[int] | None = None,
    ):
        super().__init__()
        self.network, self.head = network, head
        self.method, self.config = method, config
        self.input_shape = None if input_shape is None else tuple(int(n) for n in input_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_shape is not None and (x.dim() != 4 or tuple(x.shape[1:]) != self.input_shape):
            c, h, w = self.input_shape
            raise ModelInputError(
                f"this model takes images of shape N x {c} x {h} x {w} (C, H, W) and was given "
                f"{' x '.join(map(str, x.shape)) or 'a scalar'}; reshape the input (e.g. x.reshape(-1, {c}, {h}, {w}))"
            )
        if x.dtype == torch.uint8:
            x = x.float().div(255.0)
        return self.head(self.network(x))


def model_bytes(
    cfg: ExperimentConfig,
    method: str,
    input_shape: Sequence[int],
    num_classes: int,
    network: dict[str, Any],
    head: dict[str, Any],
) -> bytes:
    """model.pt's content (state dicts moved to the CPU, so it loads on a machine without a GPU)."""
    cpu = lambda state: {k: v.detach().cpu() for k, v in state.items()}  # noqa: E731
    payload = {
        "format": FORMAT,
        "method": method,
        "config": save_config(cfg),
        "input_shape": list(input_shape),
        "num_classes": int(num_classes),
        "network": cpu(network),
        "head": cpu(head),
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


def _read(path: str) -> tuple[str, bytes]:
    """model.pt's location and bytes; `path` is a run directory or the file itself, local or a URI."""
    path = os.fspath(path)
    fs, root, info = open_location(path, "model", ModelFileError)
    if info.type == pafs.FileType.Directory:
        _refuse_sweep(fs, root, path)
        root = f"{root.rstrip('/')}/{MODEL_FILE}"
    shown = resolve_location(path) if "://" in path else root
    try:
        with fs.open_input_stream(root) as src:
            return shown, src.read()
    except (FileNotFoundError, OSError):
        raise ModelFileError(
            f"{shown} does not exist: model.pt is written when a run finishes; pass the directory of a "
            "finished run (one with metrics.json), or rerun the job to finish this one"
        ) from None


def _refuse_sweep(fs: pafs.FileSystem, root: str, path: str) -> None:
    """A sweep's directory holds no model of its own: name where its trials' models are."""
    base = root.rstrip("/")
    if fs.get_file_info(f"{base}/{MODEL_FILE}").type == pafs.FileType.File:
        return
    trials = fs.get_file_info(pafs.FileSelector(f"{base}/{SWEEP_TRIALS}", allow_not_found=True))
    models = sorted(
        f"{SWEEP_TRIALS}/{t.base_name}/{MODEL_FILE}"
        for t in trials
        if t.type == pafs.FileType.Directory and fs.get_file_info(f"{t.path}/{MODEL_FILE}").type == pafs.FileType.File
    )
    if not trials and fs.get_file_info(f"{base}/results.csv").type != pafs.FileType.File:
        return
    shown = ", ".join(models[:3]) + (", ..." if len(models) > 3 else "") or "none finished yet"
    raise ModelFileError(
        f"{path} is a depth sweep, which has no model of its own: each trial's model is under "
        f"{SWEEP_TRIALS}/<trial>/{MODEL_FILE} ({shown}); pass one of those (see results.csv for the trials' accuracies)"
    )


def _check_device(device: torch.device | str) -> torch.device:
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"load_model(device={device!r}) is not a torch device ({exc}); use 'cpu' or 'cuda'") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (device.index or 0) >= count:
            found = "no CUDA device was found" if count == 0 else f"only {count} CUDA devices were found"
            raise ConfigError(f"load_model(device={str(device)!r}): {found} (torch.cuda); use device='cpu'")
    return device


def load_model(run_dir: str | os.PathLike, device: torch.device | str = "cpu") -> Classifier:
    """The trained network and format head of a finished run, in eval mode, mapping images to logits."""
    device = _check_device(device)
    where, data = _read(run_dir)
    try:
        saved = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        if saved.get("format") != FORMAT:
            raise ValueError(f"format {saved.get('format')!r}")
        cfg = config_from_yaml_text(saved["config"])
        network = build_network(cfg.model, tuple(saved["input_shape"]))
        network.load_state_dict(saved["network"])
        head = build_head(network.output_features, saved["num_classes"])
        head.load_state_dict(saved["head"])
    except Exception as exc:  # torch raises several types for truncated or foreign files
        raise ModelFileError(
            f"{where} is corrupt or not an hsic-ray model ({type(exc).__name__}); rerun the job into a new "
            "--output to write it again"
        ) from None
    return Classifier(network, head, saved["method"], cfg, saved["input_shape"]).to(device).eval()

"""TensorBoard event files of an HSIC run (`train.tensorboard`, `--tensorboard`) under `<output>/tensorboard/`.

They hold the records metrics.jsonl gets, as scalars: per logged step the loss, samples/s and each layer's
nHSIC terms; per epoch each layer's nHSIC on the fixed evaluation batch; per head epoch its loss; at the
end the accuracies. SummaryWriter writes to local files only, so a run on remote storage (a URI) writes
them to a local temporary directory and uploads them when the run ends.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

from hsic_ray.errors import ConfigError
from hsic_ray.run.directory import RunDirectory

DIRECTORY = "tensorboard"


def require() -> None:
    """Raise a one-line ConfigError when the tensorboard package is missing (checked before any work)."""
    import importlib

    try:
        importlib.import_module("tensorboard")  # what torch.utils.tensorboard needs
    except ImportError:
        raise ConfigError(
            "train.tensorboard=true needs the tensorboard package: pip install 'hsic-ray[tensorboard]' "
            "(or pip install tensorboard), or drop --tensorboard"
        ) from None


class TensorBoardLog:
    def __init__(self, run: RunDirectory):
        require()
        from torch.utils.tensorboard import SummaryWriter

        self.run = run
        local = run.local_path(DIRECTORY)
        self._staging = None if local is not None else tempfile.mkdtemp(prefix="hsic-ray-tb-")
        self.writer = SummaryWriter(local or self._staging)

    def record(self, record: dict[str, Any]) -> None:
        """One metrics.jsonl record; kinds without scalars (checkpoint, resume, recovery) are skipped."""
        kind, add = record.get("kind"), self.writer.add_scalar
        if kind == "step":
            step = record["step"]
            add("train/loss", record["loss"], step)
            add("train/samples_per_second", record["samples_per_second"], step)
            for i, (zx, zy) in enumerate(zip(record["nhsic_zx"], record["nhsic_zy"])):
                add(f"nhsic_zx/layer_{i:02d}", zx, step)
                add(f"nhsic_zy/layer_{i:02d}", zy, step)
        elif kind == "epoch":
            for i, layer in enumerate(record["per_layer"]):
                add(f"eval_nhsic_zx/layer_{i:02d}", layer["nhsic_zx"], record["epoch"])
                add(f"eval_nhsic_zy/layer_{i:02d}", layer["nhsic_zy"], record["epoch"])
        elif kind == "format_epoch":
            add("head/loss", record["loss"], record["epoch"])

    def final(self, metrics: dict[str, Any]) -> None:
        for key in ("test_accuracy_formatted", "train_accuracy_formatted", "test_accuracy_unformatted"):
            if metrics.get(key) is not None:
                self.writer.add_scalar(f"accuracy/{key}", metrics[key], metrics["steps"])

    def close(self) -> None:
        self.writer.close()
        if self._staging is None:
            return
        for parent, _, files in os.walk(self._staging):
            for name in files:
                path = os.path.join(parent, name)
                with open(path, "rb") as f:
                    self.run.write_bytes(f"{DIRECTORY}/{os.path.relpath(path, self._staging)}", f.read())
        shutil.rmtree(self._staging, ignore_errors=True)

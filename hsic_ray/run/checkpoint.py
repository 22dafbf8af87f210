"""Checkpoints in a run directory: one file per stage, the coordinator's state, and a manifest written last.

    checkpoints/step-00000100/stage-000.pt ...   each stage's layers, optimizers, BatchNorm statistics
    checkpoints/step-00000100/coordinator.pt     head, data position, counters, RNG state, metrics so far
    checkpoints/step-00000100/MANIFEST.json      written after every other file: its presence marks the
                                                 checkpoint complete
    checkpoints/LATEST                           the newest complete step, replaced atomically (for people:
                                                 runs resume from the complete checkpoints on disk)

A crash mid-write leaves at worst an incomplete directory without a manifest, which is never loaded. A
complete checkpoint whose files no longer load is set aside (renamed `unreadable-step-...`, never deleted)
and the run resumes from the newest one that loads.
"""

from __future__ import annotations

import io
import json
from typing import Any

import torch

from hsic_ray.errors import CheckpointError
from hsic_ray.run.directory import RunDirectory

ROOT = "checkpoints"
KEEP = 2  # complete checkpoints kept; older ones are deleted once a newer one is complete
# What a run's other files take besides its weights: plots, metrics, config, TensorBoard events (generously).
RESULTS_BYTES = 8 * 2**20


def storage_bytes(parameters: int) -> int:
    """Disk a run of a network with `parameters` float32 parameters needs at most: KEEP complete checkpoints
    and one being written (weights and momentum each), model.pt, and its results."""
    return 4 * parameters * (2 * (KEEP + 1) + 1) + RESULTS_BYTES


def checkpoint_dir(step: int) -> str:
    return f"{ROOT}/step-{step:08d}"


def stage_file(step: int, stage: int) -> str:
    return f"{checkpoint_dir(step)}/stage-{stage:03d}.pt"


def coordinator_file(step: int) -> str:
    return f"{checkpoint_dir(step)}/coordinator.pt"


def save_state(run: RunDirectory, name: str, state: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    run.write_bytes(name, buffer.getvalue())


def load_state(run: RunDirectory, name: str) -> dict[str, Any]:
    try:
        data = run.read_bytes(name)
    except (FileNotFoundError, OSError) as exc:
        raise CheckpointError(f"checkpoint file {run.path(name)} is missing: {exc}") from None
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for truncated or foreign files
        raise CheckpointError(f"checkpoint file {run.path(name)} is corrupt ({type(exc).__name__})") from None


def commit(run: RunDirectory, step: int, num_stages: int) -> None:
    """Mark step's checkpoint complete (after all its files are written) and drop old ones."""
    run.write_json(f"{checkpoint_dir(step)}/MANIFEST.json", {"step": step, "stages": num_stages})
    run.write_text(f"{ROOT}/LATEST", f"{step}\n")
    for old in complete_steps(run)[:-KEEP]:
        run.delete_dir(checkpoint_dir(old))


def complete_steps(run: RunDirectory) -> list[int]:
    steps = []
    for name in run.list_dir(ROOT):
        if name.startswith("step-") and run.exists(f"{ROOT}/{name}/MANIFEST.json"):
            steps.append(int(name[len("step-") :]))
    return sorted(steps)


def latest_step(run: RunDirectory) -> int | None:
    """The newest complete checkpoint's step, or None when the run has none."""
    steps = complete_steps(run)
    return steps[-1] if steps else None


def resume_point(run: RunDirectory) -> tuple[int | None, dict[int, str]]:
    """The newest complete checkpoint whose every file loads (None: there is none), and why each newer
    complete checkpoint cannot be loaded ({step: reason}). Reads only."""
    unreadable: dict[int, str] = {}
    for step in reversed(complete_steps(run)):
        try:
            verify(run, step)
            return step, unreadable
        except CheckpointError as exc:
            unreadable[step] = str(exc)
    if unreadable:
        reasons = "; ".join(f"step {step}: {why}" for step, why in unreadable.items())
        raise CheckpointError(
            f"no checkpoint in {run.uri} can be loaded ({reasons}); start a new run with another --output"
        )
    return None, unreadable


def set_aside(run: RunDirectory, step: int) -> str:
    """Rename step's checkpoint so that it is never loaded nor overwritten; returns its new name."""
    name = f"{ROOT}/unreadable-step-{step:08d}"
    run.move(checkpoint_dir(step), name)
    return name


def read_manifest(run: RunDirectory, step: int) -> dict[str, Any]:
    try:
        return json.loads(run.read_text(f"{checkpoint_dir(step)}/MANIFEST.json"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint manifest for step {step} in {run.uri} is unreadable: {exc}") from None


def network_state(run: RunDirectory, step: int) -> dict[str, Any]:
    """The whole network's state dict (`LayerwiseNet` keys) from step's stage files, stages in order."""
    layers = [
        layer
        for stage in range(read_manifest(run, step)["stages"])
        for layer in load_state(run, stage_file(step, stage))["layers"]
    ]
    return {f"layers.{i}.{key}": value for i, layer in enumerate(layers) for key, value in layer.items()}


def verify(run: RunDirectory, step: int) -> dict[str, Any]:
    """Load every file of step's checkpoint once, so a corrupt one stops the run before any work starts.

    Returns the manifest.
    """
    manifest = read_manifest(run, step)
    load_state(run, coordinator_file(step))
    for stage in range(manifest["stages"]):
        load_state(run, stage_file(step, stage))
    return manifest

"""HSIC-bottleneck training of deep networks, layer by layer, on Ray."""

from __future__ import annotations

import importlib
from typing import Any

# Public names, imported on first use: the command line (hsic_ray.cli, hsic_ray.config) must load without
# torch or Ray, and importing the package would otherwise import both.
_PUBLIC = {
    "load_model": "hsic_ray.run.model_io",
    "load_dataset": "hsic_ray.data.sources",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'hsic_ray' has no attribute {name!r}")
    return getattr(importlib.import_module(_PUBLIC[name]), name)

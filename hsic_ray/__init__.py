"""HSIC-bottleneck training of deep networks, layer by layer, on Ray."""

from hsic_ray.run.model_io import load_model

__all__ = ["load_model"]

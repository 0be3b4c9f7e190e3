"""swd: Scale-wise Distillation of flow-matching diffusion models."""

__version__ = "0.1.0"

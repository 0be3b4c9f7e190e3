"""swd: Scale-wise Distillation of flow-matching diffusion models."""

__version__ = "0.1.0"

__all__ = ["ScaleWisePipeline", "load_lora"]


def __getattr__(name: str):
    """Lazy exports: ``import swd`` (and the CLI) stays free of diffusers until they are used."""
    if name in __all__:
        from . import pipeline  # lazy: diffusers loads only when the pipeline is used

        return getattr(pipeline, name)
    raise AttributeError(f"module 'swd' has no attribute {name!r}")

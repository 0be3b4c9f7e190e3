"""Backbones, conditioning and block-feature hooks."""

from .backbone import Denoiser, build_denoiser, load_denoiser, load_model_config, save_denoiser
from .conditioning import ClassConditioner, Condition, TextConditioner, resolve_text_encoder
from .hooks import capture_outputs

__all__ = [
    "ClassConditioner",
    "Condition",
    "Denoiser",
    "TextConditioner",
    "build_denoiser",
    "capture_outputs",
    "load_denoiser",
    "load_model_config",
    "resolve_text_encoder",
    "save_denoiser",
]

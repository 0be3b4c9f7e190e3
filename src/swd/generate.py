"""Sampling a Denoiser: the teacher's guided Euler ODE and scale-wise schedules.

Thin glue between a model, its conditions and the pure samplers in :mod:`swd.sampling`.
"""

from __future__ import annotations

import torch

from .models import Denoiser
from .models.conditioning import ConditionValues
from .sampling import Callback, randn, sample_euler, sample_scalewise
from .schedule import ScaleSchedule, SizeLike, as_size, teacher_sigmas


def conditioned_velocity(model: Denoiser, values: ConditionValues, guidance: float):
    """``(x, sigma) -> v`` for these condition values with ``guidance`` (null pass only if needed)."""
    n = len(values)
    cond = model.condition(values)
    null = model.null_condition(n) if model.needs_null_condition(guidance) else None
    return model.velocity_fn(cond, null, guidance)


@torch.no_grad()
def generate_teacher(
    model: Denoiser,
    values: ConditionValues,
    size: SizeLike,
    generator: torch.Generator,
    steps: int = 28,
    shift: float = 3.0,
    guidance: float = 1.0,
    callback: Callback = None,
) -> torch.Tensor:
    """Full-resolution guided Euler sampling on the shifted teacher grid; returns (B, C, H, W)."""
    model.check_size(size)
    device = next(model.transformer.parameters()).device
    h, w = as_size(size)
    noise = randn((len(values), model.channels, h, w), generator, device)
    sigmas = teacher_sigmas(steps, shift)
    return sample_euler(conditioned_velocity(model, values, guidance), noise, sigmas, callback)


@torch.no_grad()
def generate_scalewise(
    model: Denoiser,
    values: ConditionValues,
    schedule: ScaleSchedule,
    generator: torch.Generator,
    guidance: float = 1.0,
    upsample_mode: str = "bicubic",
    callback: Callback = None,
) -> torch.Tensor:
    """Scale-wise sampling of ``schedule``; returns (B, C, H, W) at the final size."""
    model.check_schedule(schedule)
    device = next(model.transformer.parameters()).device
    return sample_scalewise(
        conditioned_velocity(model, values, guidance), schedule, len(values), model.channels, generator, device, upsample_mode, callback=callback
    )


def network_evaluations(steps: int, guidance: float) -> int:
    """Forward passes per image (a guided step costs two)."""
    return steps * (2 if guidance != 1.0 else 1)

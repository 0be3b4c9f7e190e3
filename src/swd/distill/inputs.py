"""What the student sees at each stage of training (spec section 5, steps 1-3), as pure functions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..schedule import ScaleSchedule, Size, add_noise, downsample, teacher_sigmas, upsample


@dataclass
class StageInputs:
    stage: int
    x_t: torch.Tensor  # (B, C, h_i, w_i) previous-size target, upsampled, noised to sigma_i
    sigma: torch.Tensor  # (B,) sigma_i
    target: torch.Tensor  # (B, C, h_i, w_i) the image area-downscaled to the stage's size
    previous: torch.Tensor  # (B, C, h_i, w_i) the clean previous-size target, upsampled (before noise)


def stage_of(step: int, num_stages: int) -> int:
    """Stages rotate round-robin with the step; a batch shares its stage."""
    return step % num_stages


def training_schedule(schedule: ScaleSchedule, mode: str) -> ScaleSchedule:
    """The schedule the student is trained (and sampled) with: scale-wise, or every stage at the final size."""
    if mode == "scalewise":
        return schedule
    if mode == "fullres":
        return ScaleSchedule.constant(schedule.final_size, schedule.sigmas)
    raise ValueError(f"unknown distill.mode {mode!r}; use 'scalewise' or 'fullres'")


def stage_inputs(
    images: torch.Tensor | None,
    schedule: ScaleSchedule,
    stage: int,
    eps: torch.Tensor,
    upsample_mode: str = "bicubic",
    to_model_space: Callable[[torch.Tensor, Size], torch.Tensor] = downsample,
) -> StageInputs:
    """Target at size s_i and the noisy input built from size s_{i-1} (s_1 for the first stage).

    ``to_model_space(images, size)`` area-downscales in PIXEL space and, for latent models,
    encodes (``Denoiser.to_model_space``); the default is the pixel-space downscale. The previous
    target is upsampled clean in the model's space, then noised (never noise-then-upsample).
    ``eps`` has the stage's shape. ``images`` may be None when ``to_model_space`` reads cached
    encodings instead.
    """
    size = schedule.sizes[stage]
    previous = schedule.previous_size(stage)
    target = to_model_space(images, size)  # (B, C, h_i, w_i)
    upsampled = upsample(to_model_space(images, previous), size, upsample_mode)
    if eps.shape != target.shape:
        raise ValueError(f"noise shape {tuple(eps.shape)} does not match the stage-{stage} target {tuple(target.shape)}")
    sigma = torch.full((target.shape[0],), float(schedule.sigmas[stage]), device=target.device, dtype=target.dtype)
    return StageInputs(stage, add_noise(upsampled, eps, sigma), sigma, target, upsampled)


def loss_grid(steps: int = 28, shift: float = 3.0) -> torch.Tensor:
    """The teacher grid's nonzero sigmas (index 0 = 1.0 ... index steps-1)."""
    return teacher_sigmas(steps, shift)[:-1]


def check_index_range(name: str, indices, grid_len: int) -> tuple[int, int]:
    if len(indices) != 2 or not 0 <= int(indices[0]) <= int(indices[1]) < grid_len:
        raise ValueError(f"distill.{name} must be [first, last] with 0 <= first <= last < {grid_len} (the grid's nonzero sigmas), got {list(indices)}")
    return int(indices[0]), int(indices[1])


def sample_grid_sigmas(grid: torch.Tensor, first: int, last: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` sigmas drawn uniformly from grid indices first..last (inclusive), (n,)."""
    idx = torch.randint(first, last + 1, (n,), generator=generator)
    return grid[idx]

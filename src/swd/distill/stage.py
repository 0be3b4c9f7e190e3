"""What the student sees at each stage of training (spec section 5, steps 1-3).

:func:`stage_inputs` is the pure part (target, upsampled previous target, noisy input);
:func:`build_stage` is the one place a training batch becomes a stage's loss context, for the
trainer and for ``swd bench`` alike.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch

from ..models import Denoiser
from ..models.conditioning import Condition
from ..sampling import sample_scalewise
from ..schedule import ScaleSchedule, Size, add_noise, downsample, upsample
from ..train.batches import condition_values
from .cache import cached_condition, cached_model_space, is_cached
from .noise import BatchNoise, NoiseLevels


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


@dataclass
class LossContext:
    """What both phases of an iteration read: the stage batch, its conditions and the noise levels."""

    inputs: StageInputs
    cond: Condition  # frozen base's condition for the batch
    null: Condition | None  # null condition (teacher guidance in DMD)
    student_cond: object  # what the student's forward takes (a Condition, or raw values for a full copy)
    levels: NoiseLevels


@torch.no_grad()
def build_stage(
    base: Denoiser,
    batch: dict,
    schedule: ScaleSchedule,
    stage: int,
    noise: BatchNoise,
    levels: NoiseLevels,
    upsample_mode: str = "bicubic",
    null_guidance: float | None = None,
    student_takes_values: bool = False,
) -> LossContext:
    """A training batch (images or cached encodings, labels or captions) as stage ``stage``'s loss context.

    ``null_guidance``: the guidance the teacher runs with inside DMD (a null condition is made when
    that guidance needs one); None when no loss guides the teacher. ``student_takes_values``: a
    full student copy trains its own conditioner and takes the raw labels / captions.
    """
    device = noise.device
    values = condition_values(batch)
    if isinstance(values, torch.Tensor):
        values = values.to(device)
    if is_cached(batch):  # encodings from data.cache_dir: no image decoding, no VAE or text encoder
        images, cond, to_model_space = None, cached_condition(batch, device), cached_model_space(batch, device)
    else:
        images, cond, to_model_space = batch["image"].to(device), base.condition(values), base.to_model_space
    null = None
    if null_guidance is not None and base.needs_null_condition(null_guidance):
        null = base.null_condition(len(values))
    eps = noise.randn(base.channels, *schedule.sizes[stage])
    inputs = stage_inputs(images, schedule, stage, eps, upsample_mode, to_model_space)
    return LossContext(inputs, cond, null, values if student_takes_values else cond, levels)


@torch.no_grad()
def simulated_inputs(student: Callable, inputs: StageInputs, schedule: ScaleSchedule, student_cond, noise: BatchNoise,
                     upsample_mode: str = "bicubic") -> StageInputs:
    """Stage ``i``'s input made as at sampling time: the student's OWN stages 0..i-1, run from fresh
    noise, upsampled to s_i and noised to sigma_i (DMD2's "backward simulation"). The target stays
    the real image. Stage 0 has no earlier stage and is returned as it is (at sigma 1.0 its input is
    pure noise either way).

    ``student(x, sigma, cond) -> x0`` (frozen; no gradient is kept). The noise is drawn from ``noise``,
    so every process sees the draws one process would see for the whole batch.
    """
    if inputs.stage == 0:
        return inputs
    head = ScaleSchedule(schedule.sizes[: inputs.stage], [*schedule.sigmas[: inputs.stage], 0.0])

    def velocity(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:  # the sampler's convention, from the x0 prediction
        return (x - student(x, sigma, student_cond)) / sigma.view(-1, *([1] * (x.ndim - 1)))

    start = noise.randn(inputs.target.shape[1], *head.sizes[0])
    earlier = sample_scalewise(velocity, start, head, lambda shape: noise.randn(*shape[1:]), upsample_mode)
    previous = upsample(earlier, schedule.sizes[inputs.stage], upsample_mode).to(inputs.target.dtype)
    return replace(inputs, x_t=add_noise(previous, noise.randn(*previous.shape[1:]), inputs.sigma), previous=previous)

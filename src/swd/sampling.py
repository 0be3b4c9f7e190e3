"""Samplers as pure functions (k-diffusion style): noise and noise levels in, a callback out.

A sampler takes a ``velocity_fn(x, sigma) -> v`` (sigma is a (B,) tensor), the starting noise and
the noise levels; a scale-wise sampler also takes ``noise_fn(shape)``, which draws the fresh noise
of each later stage (k-diffusion's ``noise_sampler``). ``callback(info)`` is called after every
step with a dict: ``step``, ``sigma``, ``x`` (the network input) and ``denoised`` (the clean
prediction at that step's size).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from .schedule import ScaleSchedule, add_noise, clean_from_velocity, upsample

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
NoiseFn = Callable[[tuple[int, ...]], torch.Tensor]  # shape (B, C, H, W) -> standard normal noise
Callback = Optional[Callable[[dict], None]]


def randn(shape: tuple[int, ...], generator: torch.Generator, device: torch.device | str, dtype=torch.float32) -> torch.Tensor:
    """Standard normal noise drawn on the generator's device, then moved to ``device``, so a seed
    gives the same samples whatever device the model runs on."""
    return torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32).to(device=device, dtype=dtype)


def generator_noise(generator: torch.Generator, device: torch.device | str) -> NoiseFn:
    """A ``noise_fn`` that draws every stage's fresh noise from ``generator`` (see :func:`randn`)."""
    return lambda shape: randn(shape, generator, device)


def _sigma_batch(sigma: float, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), float(sigma), device=x.device, dtype=x.dtype)


@torch.no_grad()
def sample_euler(velocity_fn: VelocityFn, noise: torch.Tensor, sigmas: torch.Tensor, callback: Callback = None) -> torch.Tensor:
    """The teacher's deterministic Euler ODE sampler: ``x <- x + (sigma_next - sigma) v``.

    ``sigmas`` runs from the starting level (1.0 for pure noise) down to 0.
    """
    x = noise
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        v = velocity_fn(x, _sigma_batch(sigma, x))
        if callback is not None:
            callback({"step": i, "sigma": sigma, "x": x, "denoised": clean_from_velocity(x, v, sigma)})
        x = x + (sigma_next - sigma) * v
    return x


@torch.no_grad()
def sample_scalewise(
    velocity_fn: VelocityFn,
    noise: torch.Tensor,
    schedule: ScaleSchedule,
    noise_fn: NoiseFn,
    upsample_mode: str = "bicubic",
    callback: Callback = None,
) -> torch.Tensor:
    """Scale-wise stochastic multistep sampling from ``noise`` (B, C, *sizes[0]) (spec section 4).

    At each stage: predict the clean sample, upsample that prediction (never the noisy input) to
    the next size and re-noise it with fresh noise ``noise_fn(shape)`` to the next sigma.
    """
    if tuple(noise.shape[-2:]) != schedule.sizes[0]:
        raise ValueError(f"noise of size {tuple(noise.shape[-2:])} does not match the schedule's first size {schedule.sizes[0]}")
    x = noise
    denoised = x
    for i in range(schedule.num_steps):
        sigma = schedule.sigmas[i]
        denoised = clean_from_velocity(x, velocity_fn(x, _sigma_batch(sigma, x)), sigma)
        if callback is not None:
            callback({"step": i, "sigma": sigma, "x": x, "denoised": denoised})
        if i + 1 == schedule.num_steps:
            break
        denoised = upsample(denoised, schedule.sizes[i + 1], upsample_mode)
        x = add_noise(denoised, noise_fn(tuple(denoised.shape)), schedule.sigmas[i + 1])
    return denoised


def guided_velocity(velocity_fn: Callable[[torch.Tensor, torch.Tensor, object], torch.Tensor], cond, null_cond, guidance: float) -> VelocityFn:
    """Classifier-free guidance: ``v_uncond + w (v_cond - v_uncond)``, one batched forward.

    ``velocity_fn(x, sigma, cond)`` is the conditional model; ``cond`` / ``null_cond`` are
    condition objects supporting ``cat`` (see :class:`swd.models.Condition`). ``guidance == 1``
    skips the unconditional pass.
    """
    if guidance == 1.0:
        return lambda x, sigma: velocity_fn(x, sigma, cond)
    both = cond.cat(null_cond)

    def fn(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        v = velocity_fn(torch.cat([x, x]), torch.cat([sigma, sigma]), both)
        v_cond, v_uncond = v.chunk(2)
        return v_uncond + guidance * (v_cond - v_uncond)

    return fn


def interval_velocity(guided: VelocityFn, plain: VelocityFn, interval: tuple[float, float]) -> VelocityFn:
    """Guidance in a limited interval of noise levels (Kynkaanniemi et al. 2024): ``guided`` at
    steps whose sigma lies in ``[lo, hi]``, ``plain`` at the others.

    The samplers give every image of a call the same sigma, so the first one decides.
    """
    interval = check_guidance_interval(interval)

    def fn(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return guided(x, sigma) if in_interval(float(sigma[0]), interval) else plain(x, sigma)

    return fn


def in_interval(sigma: float, interval: tuple[float, float]) -> bool:
    """Whether ``sigma`` lies in ``[lo, hi]``, up to float32 rounding (sigmas reach the network as float32)."""
    lo, hi = interval
    return lo - 1e-6 <= sigma <= hi + 1e-6


def check_guidance_interval(interval) -> tuple[float, float]:
    """``(lo, hi)`` of a guidance interval, refused unless ``0 <= lo <= hi <= 1`` (sigma runs 1 -> 0)."""
    if len(interval) != 2:
        raise ValueError(f"a guidance interval is [lo, hi] (two noise levels), got {list(interval)}")
    lo, hi = (float(v) for v in interval)
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"guidance interval [{lo}, {hi}] must satisfy 0 <= lo <= hi <= 1 (noise levels, 1 = pure noise); "
                         "e.g. [0.9, 1.0] guides only the first, noisiest steps")
    return lo, hi

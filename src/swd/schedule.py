"""Noise levels and resolutions: the teacher's sigma grid and the scale-wise schedule.

One convention everywhere in swd (spec section 2): ``x_t = (1 - sigma) * x0 + sigma * eps`` with
sigma in [0, 1]; networks predict the velocity ``v = eps - x0``. Adapters convert to whatever
timestep a backbone expects.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler

from .config import ScheduleConfig

Size = tuple[int, int]
SizeLike = Union[int, Sequence[int]]

UPSAMPLE_MODES = ("bicubic", "bilinear", "nearest", "nearest-exact", "area")


def teacher_sigmas(num_steps: int = 28, shift: float = 3.0) -> torch.Tensor:
    """The teacher's sigma grid, ``num_steps + 1`` values from 1 down to 0 (float32).

    Taken from diffusers' ``FlowMatchEulerDiscreteScheduler`` so that the grid is exactly the
    one SD3 pipelines use: ``sigma' = s * sigma / (1 + (s - 1) * sigma)``.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(num_steps)
    return scheduler.sigmas.to(torch.float32).clone()


def as_size(size: SizeLike) -> Size:
    """``32 -> (32, 32)``; ``(24, 32) -> (24, 32)``; anything else is an error."""
    if isinstance(size, bool):
        raise ValueError(f"a size must be an int or an (height, width) pair, got {size!r}")
    if isinstance(size, int):
        pair = (size, size)
    elif isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(s, int) and not isinstance(s, bool) for s in size):
        pair = (int(size[0]), int(size[1]))
    else:
        raise ValueError(f"a size must be an int or an (height, width) pair of ints, got {size!r}")
    if min(pair) < 1:
        raise ValueError(f"sizes must be positive, got {size!r}")
    return pair


@dataclass(frozen=True)
class ScaleSchedule:
    """Sizes and noise levels of a scale-wise sampler with ``n`` stages.

    ``sizes[i]`` is the spatial size the network runs at in stage ``i`` (an int for square or a
    (height, width) pair); ``sigmas`` has ``n + 1`` values: ``sigmas[i]`` is the noise level of
    stage ``i`` and the last one is 0 (the clean result). Invalid input raises ``ValueError``
    that says what is wrong and how to fix it.
    """

    sizes: tuple[Size, ...]
    sigmas: tuple[float, ...]

    def __init__(self, sizes: Sequence[SizeLike], sigmas: Sequence[float]):
        sizes_t = tuple(as_size(s) for s in sizes)
        sigmas_t = tuple(float(s) for s in sigmas)
        _validate(sizes_t, sigmas_t)
        object.__setattr__(self, "sizes", sizes_t)
        object.__setattr__(self, "sigmas", sigmas_t)

    @property
    def num_steps(self) -> int:
        return len(self.sizes)

    @property
    def final_size(self) -> Size:
        return self.sizes[-1]

    def previous_size(self, stage: int) -> Size:
        """Size the input of ``stage`` is upsampled from (the first stage's own size for stage 0)."""
        return self.sizes[max(stage - 1, 0)]

    @classmethod
    def from_config(cls, cfg: ScheduleConfig) -> "ScaleSchedule":
        """The schedule a config's ``schedule`` section names (each command builds it once)."""
        return cls(cfg.sizes, cfg.sigmas)

    @classmethod
    def constant(cls, size: SizeLike, sigmas: Sequence[float]) -> "ScaleSchedule":
        """A full-resolution schedule: every stage at ``size``."""
        return cls([size] * (len(sigmas) - 1), sigmas)

    @classmethod
    def from_grid(cls, sizes: Sequence[SizeLike], indices: Sequence[int], num_steps: int = 28, shift: float = 3.0) -> "ScaleSchedule":
        """Sigmas picked from the teacher grid by index, e.g. indices 0, 7, 14, 18 (+ the final 0)."""
        grid = teacher_sigmas(num_steps, shift)
        bad = [i for i in indices if not 0 <= i < num_steps]
        if bad:
            raise ValueError(f"grid indices {bad} are outside 0..{num_steps - 1} of a {num_steps}-step grid")
        return cls(sizes, [float(grid[i]) for i in indices] + [0.0])

    def tokens(self, patch_size: int) -> list[int]:
        """Tokens the backbone processes at each stage."""
        return [(h // patch_size) * (w // patch_size) for h, w in self.sizes]


def _validate(sizes: tuple[Size, ...], sigmas: tuple[float, ...]) -> None:
    n = len(sizes)
    if n == 0:
        raise ValueError("a schedule needs at least one size")
    example = "e.g. sizes [16, 20, 24, 32] with sigmas [1.0, 0.8959, 0.7371, 0.6022, 0.0]"
    if len(sigmas) != n + 1:
        raise ValueError(
            f"got {n} sizes and {len(sigmas)} sigmas: a schedule of n stages needs n + 1 sigmas, "
            f"the last of them 0 ({example})"
        )
    if sigmas[-1] != 0.0:
        raise ValueError(f"the last sigma must be 0 (the clean sample), got {sigmas[-1]} ({example})")
    out_of_range = [s for s in sigmas if not 0.0 <= s <= 1.0]
    if out_of_range:
        raise ValueError(f"sigmas must lie in [0, 1], got {out_of_range}")
    for i in range(n):
        if not sigmas[i] > sigmas[i + 1]:
            raise ValueError(
                f"sigmas must strictly decrease, but sigma[{i}]={sigmas[i]} <= sigma[{i + 1}]={sigmas[i + 1]}"
            )
    for i in range(1, n):
        (h0, w0), (h1, w1) = sizes[i - 1], sizes[i]
        if h1 < h0 or w1 < w0:
            raise ValueError(
                f"sizes must not shrink, but stage {i} has {sizes[i]} after {sizes[i - 1]}; "
                "scale-wise sampling only upsamples"
            )


def downsample(images: torch.Tensor, size: SizeLike) -> torch.Tensor:
    """Area (box-filter) downscaling, the anti-aliased way to make a low-resolution target."""
    size = as_size(size)
    if tuple(images.shape[-2:]) == size:
        return images
    if images.shape[-2] < size[0] or images.shape[-1] < size[1]:
        raise ValueError(f"downsample: target {size} is larger than the input {tuple(images.shape[-2:])}")
    return F.interpolate(images, size=size, mode="area")


def upsample(images: torch.Tensor, size: SizeLike, mode: str = "bicubic") -> torch.Tensor:
    """Upscale a clean prediction to the next stage's size (identity if already there).

    Bicubic by default: PyTorch's default ``nearest`` aliases badly (spec section 4).
    """
    if mode not in UPSAMPLE_MODES:
        raise ValueError(f"unknown upsampling mode {mode!r}; choose one of {UPSAMPLE_MODES}")
    size = as_size(size)
    if tuple(images.shape[-2:]) == size:
        return images
    kwargs = {"align_corners": False} if mode in ("bicubic", "bilinear") else {}
    return F.interpolate(images, size=size, mode=mode, **kwargs)


def add_noise(x0: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """``x_t = (1 - sigma) x0 + sigma eps``; ``sigma`` is a float or a per-sample (B,) tensor."""
    if isinstance(sigma, torch.Tensor) and sigma.ndim == 1:
        sigma = sigma.view(-1, *([1] * (x0.ndim - 1)))
    return (1 - sigma) * x0 + sigma * eps


def clean_from_velocity(x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """The clean-sample prediction ``x0 = x_t - sigma v``; ``sigma`` is a float or a per-sample (B,) tensor."""
    if isinstance(sigma, torch.Tensor) and sigma.ndim == 1:
        sigma = sigma.view(-1, *([1] * (x.ndim - 1)))
    return x - sigma * v


def euler_step_x0(x: torch.Tensor, x0: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """One Euler step of the flow ODE written with the clean prediction ``x0`` at ``sigma``:
    ``x + (sigma_next - sigma) v`` with ``v = (x - x0) / sigma``, i.e. ``x0 + (sigma_next / sigma) (x - x0)``."""
    return x0 + (sigma_next / sigma) * (x - x0)

"""A scale-wise schedule from the data's power spectrum: the math behind ``swd schedule``.

Diffusion hides frequencies in order: at noise level sigma (``x_t = (1 - sigma) x0 + sigma eps``),
every frequency whose signal power ``(1 - sigma)^2 P(f)`` lies below the noise power is lost to the
noise, and a step at that sigma can run at a size that drops those frequencies.

Normalisation, so that signal and noise compare exactly: ``P`` is the power of the orthonormal 2-D
FFT (``torch.fft.fft2(x, norm="ortho")``) of the clean data at the final size ``(H, W)``, averaged over
images and channels. By Parseval, ``P`` averages to the per-pixel power, and white noise of variance
``sigma^2`` has the flat spectrum ``sigma^2`` in every bin. Frequencies are relative to the final
size's Nyquist frequency along each axis: ``f = 1`` is ``H / 2`` cycles per image height (``W / 2``
per width), so a step of size ``(h, w) = rho (H, W)`` represents ``|f_y|, |f_x| <= rho``.

Noise drawn at a smaller size is stronger per frequency: the area-downscaled signal at ``(h, w)``
carries ``(h w / (H W)) P(f)`` in each of its own orthonormal bins, while the fresh noise of the
scale-wise sampler (spec section 4) has ``sigma^2`` in each. Measured in the final size's bins, the
noise floor of a step at ``(h, w)`` is therefore ``sigma^2 H W / (h w)`` (the effect that SD3's
resolution-dependent timestep shift corrects for). ``step_floor=True`` counts it; ``False`` compares
with ``sigma^2`` only, so that a size loses only what lies above its Nyquist frequency.

The signal above the noise at sigma is the power the signal has in excess of the noise floor, summed
over bins (the area between spectrum and floor); a step's size hides the part of it that lies beyond
its Nyquist frequency or under its own floor (:func:`lost_share`), and each step gets the smallest size
that hides at most a set share (:func:`sizes_for`) or that fits a token budget (:func:`sizes_within_budget`).

All functions are pure: tensors and numbers in, tensors and numbers out. Box-filter attenuation of
area downscaling is ignored (an ideal low-pass), and the DC bin (each image's mean, which every size
keeps) is left out of the shares.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch

Size = tuple[int, int]


# ----------------------------------------------------------------------------- the spectrum


def power_spectrum(x: torch.Tensor) -> torch.Tensor:
    """Mean orthonormal-FFT power of images ``x`` (B, C, H, W) -> (H, W) float64, ``torch.fft`` layout
    (DC at [0, 0]). White noise of variance ``v`` gives ``v`` in every bin (in expectation)."""
    spectrum = torch.fft.fft2(x.double(), norm="ortho")  # (B, C, H, W) complex
    return spectrum.abs().square().mean(dim=(0, 1))  # (H, W)


def mean_power_spectrum(batches: Iterable[torch.Tensor]) -> tuple[torch.Tensor, int]:
    """:func:`power_spectrum` over every image of ``batches`` (each (B, C, H, W), one size): (H, W), count."""
    total, count = None, 0
    for x in batches:
        power = power_spectrum(x) * len(x)  # (H, W)
        total = power if total is None else total + power
        count += len(x)
    if total is None:
        raise ValueError("no images to measure: the data source is empty")
    return total / count, count


def frequency_grid(height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-bin frequency relative to the final Nyquist, ``torch.fft`` layout: (|f_y|, |f_x|), each (H, W)
    in [0, 1]; ``f_y = k_y / (H / 2)`` for the integer frequency ``k_y`` in cycles per image."""
    fy = (torch.fft.fftfreq(height, dtype=torch.float64) * 2).abs()  # (H,)
    fx = (torch.fft.fftfreq(width, dtype=torch.float64) * 2).abs()  # (W,)
    return fy[:, None].expand(height, width), fx[None, :].expand(height, width)


def radial_profile(power: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Radially averaged spectrum: (frequencies (K,), mean power (K,)) of a (H, W) spectrum.

    Bins are ``2 / min(H, W)`` wide (one integer frequency of the shorter side) around
    ``r = sqrt(f_y^2 + f_x^2)``; the first is DC; empty bins are dropped.
    """
    height, width = power.shape
    fy, fx = frequency_grid(height, width)
    r = (fy.square() + fx.square()).sqrt()  # (H, W), up to sqrt(2)
    step = 2.0 / min(height, width)
    index = torch.round(r / step).long().flatten()  # (H * W,)
    sums = torch.zeros(int(index.max()) + 1, dtype=torch.float64).index_add_(0, index, power.flatten().double())
    counts = torch.zeros_like(sums).index_add_(0, index, torch.ones_like(sums[index]))
    keep = counts > 0
    return (torch.arange(len(sums), dtype=torch.float64) * step)[keep], sums[keep] / counts[keep]


# ----------------------------------------------------------------------------- signal against noise


def noise_floor(sigma: float, area_ratio: float = 1.0) -> float:
    """Noise power per final-size bin of white noise of std ``sigma`` drawn at ``area_ratio = h w / (H W)``
    of the final area: ``sigma^2 / area_ratio``."""
    return sigma**2 / area_ratio


def cutoff_frequency(frequencies: torch.Tensor, profile: torch.Tensor, sigma: float, area_ratio: float = 1.0) -> float:
    """Where the signal ``(1 - sigma)^2 P(f)`` of a radial profile (K,) first falls to the noise floor
    (:func:`noise_floor`), interpolated linearly in log power between the two bins around the crossing.

    DC is skipped. 0.0 when even the lowest frequency is below the noise (sigma = 1); the highest
    frequency of the profile when nothing is (sigma = 0).
    """
    if sigma >= 1.0:
        return 0.0
    floor = noise_floor(sigma, area_ratio)
    f, signal = frequencies[1:], (1 - sigma) ** 2 * profile[1:]  # (K - 1,) without DC
    below = (signal <= floor).nonzero()
    if len(below) == 0:
        return float(f[-1])
    j = int(below[0])
    if j == 0:
        return 0.0
    s0, s1 = math.log(float(signal[j - 1])), math.log(max(float(signal[j]), 1e-300))
    t = (s0 - math.log(floor)) / (s0 - s1) if s0 != s1 else 0.0
    return float(f[j - 1] + t * (f[j] - f[j - 1]))


def lost_share(power: torch.Tensor, sigma: float, size: Size, step_floor: bool = True) -> float:
    """Share of the signal above the noise at ``sigma`` that a step at ``size`` hides.

    ``power`` is the final-size spectrum (H, W). The signal above the noise is the power the signal
    has in excess of the noise floor, ``sum_k max(0, (1 - sigma)^2 P(k) - sigma^2)`` (DC left out): the
    area between the spectrum and the floor in the figure. A step at ``size = (h, w)`` sees only the
    bins with ``|k_y| <= h / 2`` and ``|k_x| <= w / 2`` (integer frequencies, cycles per image), and
    with ``step_floor`` its floor is raised to ``sigma^2 H W / (h w)``; what it hides is the excess it
    no longer has. 0.0 when nothing is above the noise (sigma = 1: any size hides nothing).
    """
    height, width = power.shape
    h, w = size
    signal = (1 - sigma) ** 2 * power  # (H, W)
    signal[0, 0] = 0.0  # DC
    ky = torch.fft.fftfreq(height, 1 / height, dtype=torch.float64).abs()[:, None]  # (H, 1) cycles per image
    kx = torch.fft.fftfreq(width, 1 / width, dtype=torch.float64).abs()[None, :]  # (1, W)
    inside = (ky <= h / 2) & (kx <= w / 2)  # (H, W)
    floor = noise_floor(sigma, h * w / (height * width) if step_floor else 1.0)
    excess = (signal - noise_floor(sigma)).clamp(min=0)  # (H, W) at the final size
    seen = torch.where(inside, (signal - floor).clamp(min=0), torch.zeros_like(signal))  # (H, W) at the step's size
    total = float(excess.sum())
    return 0.0 if total == 0.0 else float((excess - seen).sum()) / total


# ----------------------------------------------------------------------------- sizes and sigmas


def round_up(value: float, multiple: int) -> int:
    return int(math.ceil(value / multiple - 1e-9)) * multiple


def candidate_sizes(final: Size, multiple: int, min_ratio: float = 0.0) -> list[Size]:
    """Sizes a step may take, smallest first: the final aspect ratio, each side a multiple of ``multiple``
    (the patch size, in model space), at least ``min_ratio`` of the final side, at most the final size.

    Steps run along the longer side; the shorter one is ``short * long_i / long``, rounded up.
    """
    height, width = final
    if height % multiple or width % multiple:
        raise ValueError(f"the final size {final} is not a multiple of the patch size {multiple}; use a final size divisible by {multiple}")
    long, short = max(final), min(final)
    out: list[Size] = []
    for side in range(multiple, long + 1, multiple):
        other = min(short, max(multiple, round_up(short * side / long, multiple)))
        size = (side, other) if height >= width else (other, side)
        if side >= min_ratio * long - 1e-9 and other >= min_ratio * short - 1e-9 and size not in out:
            out.append(size)
    if not out or out[-1] != final:
        out.append(final)
    return out


def grid_indices(steps: int, last_index: int) -> list[int]:
    """``steps`` indices on the teacher grid, evenly spaced from 0 (sigma 1) to ``last_index``, rounded."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if steps == 1:
        return [0]
    if steps > last_index + 1:
        raise ValueError(f"{steps} steps need {steps} distinct grid points, but only {last_index + 1} lie between sigma 1 "
                         "and the last sigma: lower the last sigma, use a finer teacher grid, or fewer steps")
    return [round(i * last_index / (steps - 1)) for i in range(steps)]


def share_table(power: torch.Tensor, sigmas: Sequence[float], candidates: Sequence[Size], step_floor: bool = True) -> list[list[float]]:
    """:func:`lost_share` of every candidate size (columns) at every step's sigma but the last (rows)."""
    return [[lost_share(power, s, c, step_floor) for c in candidates] for s in sigmas[:-1]]


def pick_sizes(table: Sequence[Sequence[float]], candidates: Sequence[Size], tolerance: float) -> list[Size]:
    """Each step's size: the smallest candidate whose share (``table`` row) is at most ``tolerance``;
    the last step at the final size (its prediction is the output); never shrinking on either axis."""
    sizes = [next((c for c, share in zip(candidates, row) if share <= tolerance), candidates[-1]) for row in table]
    sizes.append(candidates[-1])
    for i in range(1, len(sizes)):
        sizes[i] = (max(sizes[i][0], sizes[i - 1][0]), max(sizes[i][1], sizes[i - 1][1]))
    return sizes


def sizes_for(power: torch.Tensor, sigmas: Sequence[float], candidates: Sequence[Size], tolerance: float,
              step_floor: bool = True) -> list[Size]:
    """The sizes of the steps at ``sigmas`` (the n steps' noise levels, without the final 0) that hide
    at most ``tolerance`` each (:func:`lost_share`), the last one at the final size."""
    return pick_sizes(share_table(power, sigmas, candidates, step_floor), candidates, tolerance)


def token_ratio(sizes: Sequence[Size], final: Size) -> float:
    """``sum_i h_i w_i / (n H W)``: tokens of the schedule against n steps at the final size."""
    return sum(h * w for h, w in sizes) / (len(sizes) * final[0] * final[1])


def sizes_within_budget(power: torch.Tensor, sigmas: Sequence[float], candidates: Sequence[Size], budget: float,
                        step_floor: bool = True) -> tuple[list[Size], float]:
    """The sizes (:func:`sizes_for`) with the smallest tolerance whose token ratio is at most ``budget``,
    and that tolerance (the largest share any step loses). Tolerances are searched over every share a
    step can lose, so the answer is exact; the final size fixes a floor of ``1 / n``."""
    final = candidates[-1]
    smallest = [candidates[0]] * (len(sigmas) - 1) + [final]
    if token_ratio(smallest, final) > budget + 1e-12:
        raise ValueError(f"a token ratio of {budget} is out of reach: with {len(sigmas)} steps, the smallest allowed size "
                         f"{candidates[0]} and the last step at the final size {final}, the schedule needs at least "
                         f"{token_ratio(smallest, final):.4f}; raise the token ratio, lower the smallest size, or use more steps")
    table = share_table(power, sigmas, candidates, step_floor)
    for tolerance in sorted({0.0} | {share for row in table for share in row}):
        sizes = pick_sizes(table, candidates, tolerance)
        if token_ratio(sizes, final) <= budget + 1e-12:
            return sizes, tolerance
    return smallest, 1.0  # unreachable: the largest share admits the smallest sizes

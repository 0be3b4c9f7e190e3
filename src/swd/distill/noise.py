"""The randomness of a distillation step: noise for the global batch, and the noise levels each
loss draws from the teacher's grid (spec section 5)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import NoiseConfig
from ..schedule import teacher_sigmas

LOSSES = ("dmd", "mmd", "critic")  # the losses that noise a sample again, each in its own index range


class BatchNoise:
    """Random draws for the GLOBAL batch from a step-seeded generator, sliced to this process.

    N processes then see exactly the noise one process would see for the whole batch, so a DDP
    update equals the single-process update (up to float summation order).
    """

    def __init__(self, seed: int, step: int, global_batch: int, rank: int, world: int, device: torch.device):
        self.generator = torch.Generator().manual_seed(seed * 7919 + 104_729 * step + 17)
        self.share = slice(rank * (global_batch // world), (rank + 1) * (global_batch // world))
        self.global_batch = global_batch
        self.device = device

    def randn(self, *shape: int) -> torch.Tensor:
        x = torch.randn((self.global_batch, *shape), generator=self.generator)
        return x[self.share].to(self.device)

    def coin(self, probability: float) -> bool:
        """One draw for the whole step, the same on every process: True with ``probability``."""
        return bool(torch.rand((), generator=self.generator).item() < probability)

    def grid_sigmas(self, grid: torch.Tensor, first: int, last: int) -> torch.Tensor:
        """Per-sample sigmas drawn uniformly from grid indices first..last (inclusive), (B,)."""
        idx = torch.randint(first, last + 1, (self.global_batch,), generator=self.generator)
        return grid[idx][self.share].to(self.device)


def loss_grid(steps: int = 28, shift: float = 3.0) -> torch.Tensor:
    """The teacher grid's nonzero sigmas (index 0 = 1.0 ... index steps-1)."""
    return teacher_sigmas(steps, shift)[:-1]


def ode_sigmas(start: float, steps: int, grid: torch.Tensor) -> list[float]:
    """``steps + 1`` noise levels from ``start`` down to 0 for a ``steps``-step ODE solve: ``start``,
    then grid levels below it evenly spaced by grid index, then 0. ``grid`` holds the nonzero sigmas
    (:func:`loss_grid`), descending."""
    below = [float(s) for s in grid if float(s) < start - 1e-6]
    levels = [float(start), *below, 0.0]
    if steps < 1 or steps > len(levels) - 1:
        raise ValueError(f"distill.loss.teacher_regression_steps {steps}: from sigma {start:.4f} the loss grid "
                         f"(distill.noise.grid_steps) has room for 1..{len(levels) - 1} steps; lower it or raise grid_steps")
    idx = torch.linspace(0, len(levels) - 1, steps + 1).round().long().tolist()
    return [levels[i] for i in idx]


def check_index_range(name: str, indices, grid_len: int) -> tuple[int, int]:
    if len(indices) != 2 or not 0 <= int(indices[0]) <= int(indices[1]) < grid_len:
        raise ValueError(f"distill.noise.{name} must be [first, last] with 0 <= first <= last < {grid_len} "
                         f"(the grid's nonzero sigmas), got {list(indices)}")
    return int(indices[0]), int(indices[1])


@dataclass(frozen=True)
class NoiseLevels:
    """The grid's nonzero sigmas and, per loss, the inclusive index range it draws from; validated
    on construction (:meth:`from_config`)."""

    grid: torch.Tensor  # (steps,) float32, on the CPU
    ranges: dict  # "dmd" / "mmd" / "critic" -> (first, last)

    @classmethod
    def from_config(cls, cfg: NoiseConfig) -> "NoiseLevels":
        grid = loss_grid(cfg.grid_steps, cfg.grid_shift)
        ranges = {k: check_index_range(f"{k}_indices", getattr(cfg, f"{k}_indices"), len(grid)) for k in LOSSES}
        return cls(grid, ranges)

    def draw(self, loss: str, noise: BatchNoise) -> torch.Tensor:
        """This process's per-sample sigmas (B,) for ``loss``, from the step's generator."""
        return noise.grid_sigmas(self.grid, *self.ranges[loss])

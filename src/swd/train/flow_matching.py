"""Flow matching, the teacher's pretraining objective, as pure functions: tensors in, an unreduced
per-sample tensor out.

The trainer owns reduction, weighting and optimisation.
"""

from __future__ import annotations

import torch


def sample_logit_normal_sigmas(n: int, generator: torch.Generator, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    """Training noise levels ``sigmoid(N(mean, std))`` (SD3's logit-normal sampling), (n,)."""
    return torch.sigmoid(mean + std * torch.randn(n, generator=generator))


def flow_matching_loss(velocity: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Rectified-flow regression ``|v - (eps - x0)|^2`` averaged per sample, (B,)."""
    return (velocity.float() - (eps - x0).float()).pow(2).flatten(1).mean(1)

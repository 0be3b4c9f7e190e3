"""DMD2 distribution matching (spec section 5, step 5): the student's gradient from the guided
teacher ("real") and the critic ("fake") predictions, and the critic's regression onto the
student's samples. Pure functions: tensors in, a per-sample tensor (B,) out.
"""

from __future__ import annotations

import torch


def _per_sample_mean(x: torch.Tensor) -> torch.Tensor:
    return x.float().flatten(1).mean(1)


def dmd_gradient(x0_hat: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor) -> torch.Tensor:
    """DMD2's normalised distribution-matching direction ``(p_real - p_fake) / mean|p_real|``.

    ``p_real = x0_hat - x0_real`` (teacher, guided), ``p_fake = x0_hat - x0_fake`` (critic);
    the normaliser is per sample; NaNs (a zero normaliser) become 0.
    """
    p_real = (x0_hat - x0_real).float()
    p_fake = (x0_hat - x0_fake).float()
    scale = p_real.abs().flatten(1).mean(1).view(-1, *([1] * (p_real.ndim - 1)))
    return torch.nan_to_num((p_real - p_fake) / scale)


def dmd_loss(x0_hat: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor) -> torch.Tensor:
    """``0.5 * mse(x0_hat, sg(x0_hat - g))`` per sample: its gradient wrt x0_hat is ``g / D``."""
    g = dmd_gradient(x0_hat.detach(), x0_real.detach(), x0_fake.detach())
    target = (x0_hat.detach().float() - g)
    return 0.5 * _per_sample_mean((x0_hat.float() - target) ** 2)


def regression_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The critic's x0 regression onto the student's samples, mse per sample."""
    return _per_sample_mean((prediction.float() - target.float()) ** 2)


def self_guidance_loss(x0_cond: torch.Tensor, x0_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """``0.5 * mse(x0_cond, sg(x0_uncond + scale * (x0_cond - x0_uncond)))`` per sample: its
    gradient wrt ``x0_cond`` is ``-(scale - 1) (x0_cond - x0_uncond) / D``, a step along the model's own
    guidance direction (``x0_uncond`` is a no-grad prediction with the null condition)."""
    target = x0_uncond.detach().float() + scale * (x0_cond.detach().float() - x0_uncond.detach().float())
    return 0.5 * _per_sample_mean((x0_cond.float() - target) ** 2)

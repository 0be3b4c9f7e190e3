"""SwD losses as pure functions (spec section 5): tensors in, a per-sample tensor (B,) out.

No optimizer, no accelerator, no train/eval flips here; the trainer weights, reduces and steps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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


def gan_generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss ``softplus(-logit(fake))``, (B,)."""
    return F.softplus(-logits_fake.float()).reshape(len(logits_fake), -1).mean(1)


def gan_discriminator_loss(logits_fake: torch.Tensor, logits_real: torch.Tensor) -> torch.Tensor:
    """``softplus(logit(fake)) + softplus(-logit(real))``, (B,)."""
    fake = F.softplus(logits_fake.float()).reshape(len(logits_fake), -1).mean(1)
    real = F.softplus(-logits_real.float()).reshape(len(logits_real), -1).mean(1)
    return fake + real


def mmd_linear(features_real: torch.Tensor, features_fake: torch.Tensor, c: float = 0.001) -> torch.Tensor:
    """Linear-kernel MMD per image with a pseudo-Huber distance (the paper's patch loss).

    features: (B, L, C), tokens are the patches of one image. ``d = (mean_L real - mean_L fake)^2``,
    loss ``mean_C(sqrt(d + c^2) - c)``, (B,).
    """
    _check_features(features_real, features_fake)
    d = (features_real.float().mean(1) - features_fake.float().mean(1)) ** 2  # (B, C)
    return (torch.sqrt(d + c * c) - c).mean(1)


def mmd_rbf(features_real: torch.Tensor, features_fake: torch.Tensor, bandwidth: float = 100.0) -> torch.Tensor:
    """Unbiased RBF-kernel MMD^2 per image, tokens as samples; ``k(a, b) = exp(-|a-b|^2 / (2 s^2))``.

    ``(sum_{i!=j} k(x_i, x_j) + sum_{i!=j} k(y_i, y_j)) / (L(L-1)) - 2 mean_{i,j} k(x_i, y_j)``, (B,).
    """
    _check_features(features_real, features_fake)
    x, y = features_real.float(), features_fake.float()
    n = x.shape[1]
    if n < 2:
        raise ValueError("the unbiased RBF MMD needs at least 2 tokens per image")

    def kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # (B, L, L)
        return torch.exp(-torch.cdist(a, b).pow(2) / (2 * bandwidth**2))

    def off_diagonal_mean(k: torch.Tensor) -> torch.Tensor:
        return (k.sum((1, 2)) - k.diagonal(dim1=1, dim2=2).sum(1)) / (n * (n - 1))

    return off_diagonal_mean(kernel(x, x)) + off_diagonal_mean(kernel(y, y)) - 2 * kernel(x, y).mean((1, 2))


def mmd_loss(features_real: torch.Tensor, features_fake: torch.Tensor, kernel: str = "linear", huber_c: float = 0.001, bandwidth: float = 100.0) -> torch.Tensor:
    if kernel == "linear":
        return mmd_linear(features_real, features_fake, huber_c)
    if kernel == "rbf":
        return mmd_rbf(features_real, features_fake, bandwidth)
    raise ValueError(f"unknown MMD kernel {kernel!r}; use 'linear' or 'rbf'")


def _check_features(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.ndim != 3 or a.shape != b.shape:
        raise ValueError(f"MMD features must both be (B, L, C) of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")

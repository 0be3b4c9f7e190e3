"""The paper's MMD "patch" loss (spec section 5, step 5): teacher block features of the real
target and of the student's sample, noised with the same noise; tokens are the patches of one
image. Pure functions: features in, a per-sample tensor (B,) out.
"""

from __future__ import annotations

import torch


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

"""The GAN term (spec section 5): a head on the critic's block features and the non-saturating
losses. The losses are pure functions: logits in, a per-sample tensor (B,) out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def gan_generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss ``softplus(-logit(fake))``, (B,)."""
    return F.softplus(-logits_fake.float()).reshape(len(logits_fake), -1).mean(1)


def gan_discriminator_loss(logits_fake: torch.Tensor, logits_real: torch.Tensor) -> torch.Tensor:
    """``softplus(logit(fake)) + softplus(-logit(real))``, (B,)."""
    fake = F.softplus(logits_fake.float()).reshape(len(logits_fake), -1).mean(1)
    real = F.softplus(-logits_real.float()).reshape(len(logits_real), -1).mean(1)
    return fake + real


class GANHead(nn.Module):
    """DMD2-style head: token-averaged block features -> ``layers`` x (LayerNorm, GELU, Linear) -> logit.

    Widths shrink linearly from the feature width to 1.
    """

    def __init__(self, width: int, layers: int = 4):
        super().__init__()
        if layers < 1:
            raise ValueError(f"distill.critic.head_layers must be >= 1, got {layers}")
        widths = [round(width + (1 - width) * i / layers) for i in range(layers + 1)]
        blocks: list[nn.Module] = []
        for w_in, w_out in zip(widths[:-1], widths[1:]):
            blocks += [nn.LayerNorm(w_in), nn.GELU(), nn.Linear(w_in, w_out)]
        self.net = nn.Sequential(*blocks)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, L, C) block features -> (B,) logits."""
        pooled = features.mean(1).to(self.net[-1].weight.dtype)  # (B, C); a bf16 teacher's features into the fp32 head
        return self.net(pooled).squeeze(-1)

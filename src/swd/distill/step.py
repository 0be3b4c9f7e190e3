"""One critic update's and one generator update's losses (spec section 5, steps 4-6).

These functions run forwards and return per-loss scalars; they never call backward, step an
optimizer or switch train/eval. The trainer does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import DistillConfig
from ..models import Denoiser
from ..models.conditioning import Condition
from ..schedule import add_noise
from .inputs import StageInputs
from .losses import dmd_loss, gan_discriminator_loss, gan_generator_loss, mmd_loss, regression_loss
from .models import CriticView, StudentView, use_adapter


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

    def grid_sigmas(self, grid: torch.Tensor, first: int, last: int) -> torch.Tensor:
        idx = torch.randint(first, last + 1, (self.global_batch,), generator=self.generator)
        return grid[idx][self.share].to(self.device)


@dataclass
class LossContext:
    """What both phases read: the stage batch, conditions and the loss grid."""

    inputs: StageInputs
    cond: Condition  # frozen base's condition for the batch
    null: Condition | None  # null condition (teacher guidance in DMD)
    student_cond: object  # what the student's forward takes (a Condition or raw values)
    grid: torch.Tensor  # the teacher grid's nonzero sigmas
    ranges: dict  # "dmd" / "mmd" / "critic" -> (first, last) grid indices


def teacher_x0(base: Denoiser, x: torch.Tensor, sigma: torch.Tensor, cond: Condition, null: Condition | None, guidance: float) -> torch.Tensor:
    """The frozen teacher's (adapters off) guided clean-sample prediction."""
    use_adapter(base.transformer, None)
    v = base.velocity_fn(cond, null, guidance)(x, sigma)  # CFG, or FLUX's embedded guidance
    return x - sigma.view(-1, *([1] * (x.ndim - 1))) * v


def critic_losses(critic: CriticView, student: StudentView, ctx: LossContext, noise: BatchNoise, cfg: DistillConfig) -> dict[str, torch.Tensor]:
    """One fake-model update: regress the student's samples; discriminate them from real targets.

    ``critic`` may be DDP-wrapped (called once, on fake and real together); ``student`` is only
    run without gradients.
    """
    inp = ctx.inputs
    shape = tuple(inp.target.shape[1:])
    with torch.no_grad():
        x_t = add_noise(inp.previous, noise.randn(*shape), inp.sigma)  # fresh noise per critic update
        x0_hat = student(x_t, inp.sigma, ctx.student_cond)
    sigma = noise.grid_sigmas(ctx.grid, *ctx.ranges["critic"])
    eps = noise.randn(*shape)
    noisy_fake = add_noise(x0_hat, eps, sigma)
    if cfg.gan_weight <= 0:  # no GAN head: regression only
        x0, _, _ = critic(noisy_fake, sigma, ctx.cond)
        return {"critic_regression": regression_loss(x0, x0_hat).mean()}
    noisy_real = add_noise(inp.target, eps, sigma)  # the real target noised alike
    n = len(x0_hat)
    x0, _, logits = critic(torch.cat([noisy_fake, noisy_real]), torch.cat([sigma, sigma]), ctx.cond.cat(ctx.cond))
    return {
        "critic_regression": regression_loss(x0[:n], x0_hat).mean(),
        "critic_gan": gan_discriminator_loss(logits[:n], logits[n:]).mean(),
    }


def critic_total(losses: dict[str, torch.Tensor], cfg: DistillConfig) -> torch.Tensor:
    total = cfg.critic_regression_weight * losses["critic_regression"]
    if "critic_gan" in losses:
        total = total + cfg.critic_gan_weight * losses["critic_gan"]
    return total


def generator_losses(student: StudentView, base: Denoiser, critic: CriticView | None, features: CriticView, ctx: LossContext, noise: BatchNoise, cfg: DistillConfig) -> dict[str, torch.Tensor]:
    """The student's losses at this stage: any subset of DMD, GAN and MMD (weights > 0).

    ``student`` may be DDP-wrapped; ``critic`` and ``features`` are the unwrapped modules, whose
    parameters are frozen during this phase (gradients flow through them to ``x0_hat`` only).
    """
    inp = ctx.inputs
    shape = tuple(inp.target.shape[1:])
    x0_hat = student(inp.x_t, inp.sigma, ctx.student_cond)  # (B, C, h, w)
    losses: dict[str, torch.Tensor] = {}
    if cfg.dmd_weight > 0 or cfg.gan_weight > 0:
        sigma = noise.grid_sigmas(ctx.grid, *ctx.ranges["dmd"])
        x_noisy = add_noise(x0_hat, noise.randn(*shape), sigma)
        if cfg.gan_weight > 0:
            x0_fake, _, logits = critic(x_noisy, sigma, ctx.cond)  # grad flows to x0_hat through the logits
            losses["gan"] = gan_generator_loss(logits).mean()
        else:
            with torch.no_grad():
                x0_fake, _, _ = critic(x_noisy, sigma, ctx.cond)
        if cfg.dmd_weight > 0:
            with torch.no_grad():
                x0_real = teacher_x0(base, x_noisy.detach(), sigma, ctx.cond, ctx.null, cfg.dmd_guidance)
            losses["dmd"] = dmd_loss(x0_hat, x0_real, x0_fake.detach()).mean()
    if cfg.mmd_weight > 0:
        sigma = noise.grid_sigmas(ctx.grid, *ctx.ranges["mmd"])
        eps = noise.randn(*shape)  # the SAME noise for real and fake
        with torch.no_grad():
            _, f_real, _ = features(add_noise(inp.target, eps, sigma), sigma, ctx.cond)
        _, f_fake, _ = features(add_noise(x0_hat, eps, sigma), sigma, ctx.cond)
        losses["mmd"] = mmd_loss(f_real, f_fake, cfg.mmd_kernel, cfg.mmd_huber_c, cfg.mmd_rbf_bandwidth).mean()
    return losses


def generator_total(losses: dict[str, torch.Tensor], cfg: DistillConfig) -> torch.Tensor:
    weights = {"mmd": cfg.mmd_weight, "dmd": cfg.dmd_weight, "gan": cfg.gan_weight}
    return sum(weights[k] * v for k, v in losses.items())

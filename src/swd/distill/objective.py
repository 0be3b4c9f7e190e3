"""The SwD objective: one critic update's and one generator update's losses (spec section 5, steps 4-6).

These functions run forwards and return per-loss scalars; they never call backward, step an
optimizer or switch train/eval (the trainer does). They read only the loss group of the config
(:class:`swd.config.LossConfig`); where each loss noises a sample again comes from the context's
:class:`swd.distill.noise.NoiseLevels`.
"""

from __future__ import annotations

import torch

from ..config import LossConfig
from ..schedule import add_noise, euler_step_x0
from .dmd import dmd_loss, regression_loss, self_guidance_loss
from .gan import gan_discriminator_loss, gan_generator_loss
from .mmd import mmd_loss
from .noise import BatchNoise, ode_sigmas
from .stage import LossContext
from .views import CriticView, StudentView, TeacherView


def repeat_condition(cond, n: int):
    """``cond`` for the batch repeated ``n`` times along the batch: a Condition, a tensor of labels or
    a list of captions."""
    if n == 1:
        return cond
    if isinstance(cond, torch.Tensor):
        return cond.repeat(n, *([1] * (cond.ndim - 1)))
    if isinstance(cond, (list, tuple)):
        return type(cond)(list(cond) * n)
    out = cond
    for _ in range(n - 1):
        out = out.cat(cond)
    return out


def critic_samples(student: StudentView, ctx: LossContext, noise: BatchNoise, n: int) -> list[torch.Tensor]:
    """``n`` student samples x0_hat (B, C, h, w), each from fresh noise on the stage input, in ONE
    no-grad forward of n * B (spec section 5, step 6: G makes x0_hat for every critic update).

    The student does not change during the critic updates, so making their samples together gives
    what making each before its update would (the noise of sample i is the i-th draw).
    """
    inp = ctx.inputs
    shape = tuple(inp.target.shape[1:])
    x_t = torch.cat([add_noise(inp.previous, noise.randn(*shape), inp.sigma) for _ in range(n)])  # (nB, C, h, w)
    with torch.no_grad():
        x0_hat = student(x_t, inp.sigma.repeat(n), repeat_condition(ctx.student_cond, n))  # (nB, C, h, w)
    return list(x0_hat.chunk(n))


def critic_losses(critic: CriticView, x0_hat: torch.Tensor, ctx: LossContext, noise: BatchNoise, cfg: LossConfig) -> dict[str, torch.Tensor]:
    """One fake-model update: regress the student's sample ``x0_hat`` (B, C, h, w, one of
    :func:`critic_samples`); discriminate it from the real targets.

    ``critic`` may be DDP-wrapped (called once per update: the real targets' logits come from a
    features-only forward inside that call).
    """
    inp = ctx.inputs
    shape = tuple(inp.target.shape[1:])
    sigma = ctx.levels.draw("critic", noise)
    eps = noise.randn(*shape)
    noisy_fake = add_noise(x0_hat, eps, sigma)
    if cfg.gan_weight <= 0:  # no GAN head: regression only
        x0 = critic(noisy_fake, sigma, ctx.cond).x0  # (B, C, h, w)
        return {"critic_regression": regression_loss(x0, x0_hat).mean()}
    noisy_real = add_noise(inp.target, eps, sigma)  # the real target noised alike
    out = critic(noisy_fake, sigma, ctx.cond, real=noisy_real)  # real: features-only forward, logits (B,)
    return {
        "critic_regression": regression_loss(out.x0, x0_hat).mean(),
        "critic_gan": gan_discriminator_loss(out.logits, out.real_logits).mean(),
    }


def critic_total(losses: dict[str, torch.Tensor], cfg: LossConfig) -> torch.Tensor:
    total = cfg.critic_regression_weight * losses["critic_regression"]
    if "critic_gan" in losses:
        total = total + cfg.critic_gan_weight * losses["critic_gan"]
    return total


def generator_losses(student: StudentView, teacher: TeacherView, critic: CriticView | None, features: CriticView, ctx: LossContext, noise: BatchNoise, cfg: LossConfig) -> dict[str, torch.Tensor]:
    """The student's losses at this stage: any subset of DMD, GAN, MMD and the teacher and real
    regressions (weights > 0; :class:`swd.config.LossConfig`).

    ``student`` may be DDP-wrapped; ``teacher``, ``critic`` and ``features`` are the unwrapped
    modules, whose parameters are frozen during this phase (gradients flow through them to
    ``x0_hat`` only). Under FSDP each is a role of the one sharded module (:class:`swd.distill.views.Roles`).
    """
    inp = ctx.inputs
    shape = tuple(inp.target.shape[1:])
    x0_hat = student(inp.x_t, inp.sigma, ctx.student_cond)  # (B, C, h, w)
    losses: dict[str, torch.Tensor] = {}
    if cfg.dmd_weight > 0 or cfg.gan_weight > 0:
        sigma = ctx.levels.draw("dmd", noise)
        x_noisy = add_noise(x0_hat, noise.randn(*shape), sigma)
        if cfg.dmd_weight > 0:  # teacher first: the critic forwards below then share one adapter switch
            with torch.no_grad():
                x0_real = teacher(x_noisy.detach(), sigma, ctx.cond, ctx.null, cfg.dmd_guidance)  # adapters off, guided
        if cfg.gan_weight > 0 and cfg.dmd_weight > 0:
            out = critic(x_noisy, sigma, ctx.cond, x0_grad=False)  # grad flows to x0_hat through the logits only
            losses["gan"] = gan_generator_loss(out.logits).mean()
            losses["dmd"] = dmd_loss(x0_hat, x0_real, out.x0.detach()).mean()
        elif cfg.gan_weight > 0:  # no DMD: no x0 needed, the forward stops at the feature block
            losses["gan"] = gan_generator_loss(critic.logits_only(x_noisy, sigma, ctx.cond)).mean()
        else:
            with torch.no_grad():
                x0_fake = critic(x_noisy, sigma, ctx.cond).x0  # (B, C, h, w)
            losses["dmd"] = dmd_loss(x0_hat, x0_real, x0_fake).mean()
    if stage_takes(cfg.teacher_regression_weight, cfg.teacher_regression_stages, inp.stage):
        with torch.no_grad():  # from the student's own input
            x0_guided = teacher_solution(teacher, inp.x_t, inp.sigma, ctx, cfg.dmd_guidance, cfg.teacher_regression_steps)
        losses["teacher_regression"] = regression_loss(x0_hat, x0_guided).mean()
    if cfg.real_regression_weight > 0:
        losses["real_regression"] = regression_loss(x0_hat, inp.target).mean()  # the stage's own real image
    if stage_takes(cfg.self_guidance_weight, cfg.self_guidance_stages, inp.stage):
        if ctx.null is None:
            raise ValueError("distill.loss.self_guidance_weight needs the null condition: this model has none "
                             "(it embeds guidance); set self_guidance_weight=0")
        with torch.no_grad():
            x0_uncond = student(inp.x_t, inp.sigma, ctx.null)  # the same input, the null condition
        losses["self_guidance"] = self_guidance_loss(x0_hat, x0_uncond, cfg.self_guidance_scale).mean()
    if mmd_applies(cfg, inp.stage):
        sigma = ctx.levels.draw("mmd", noise)
        eps = noise.randn(*shape)  # the SAME noise for real and fake
        with torch.no_grad():
            f_real = features.features_only(add_noise(inp.target, eps, sigma), sigma, ctx.cond)  # (B, L, C')
        f_fake = features.features_only(add_noise(x0_hat, eps, sigma), sigma, ctx.cond)  # (B, L, C')
        losses["mmd"] = mmd_loss(f_real, f_fake, cfg.mmd_kernel, cfg.mmd_huber_c, cfg.mmd_rbf_bandwidth).mean()
    return losses


def teacher_solution(teacher: TeacherView, x_t: torch.Tensor, sigma: torch.Tensor, ctx: LossContext, guidance: float, steps: int) -> torch.Tensor:
    """The guided teacher's clean sample from ``x_t`` (B, C, h, w) at the stage's ``sigma`` (B,, one
    value): its one-step prediction (``steps`` 1), or its Euler ODE solution down to 0 in ``steps``
    steps on the loss grid (:func:`swd.distill.noise.ode_sigmas`); the last step lands on the last x0."""
    x0 = teacher(x_t, sigma, ctx.cond, ctx.null, guidance)
    if steps == 1:
        return x0
    levels = ode_sigmas(float(sigma[0]), steps, ctx.levels.grid)
    x = x_t
    for i in range(1, steps):
        x = euler_step_x0(x, x0, levels[i - 1], levels[i])
        x0 = teacher(x, torch.full_like(sigma, levels[i]), ctx.cond, ctx.null, guidance)
    return x0


def mmd_applies(cfg: LossConfig, stage: int) -> bool:
    """Whether stage ``stage``'s generator loss has the MMD term (``mmd_weight`` > 0 and the stage in ``mmd_stages``)."""
    return stage_takes(cfg.mmd_weight, cfg.mmd_stages, stage)


def stage_takes(weight: float, stages, stage: int) -> bool:
    """Whether a loss of ``weight`` limited to ``stages`` (None: every stage) applies at ``stage``."""
    return weight > 0 and (stages is None or stage in stages)


def generator_total(losses: dict[str, torch.Tensor], cfg: LossConfig) -> torch.Tensor:
    if not losses:
        raise ValueError("the generator loss has no term at this stage: distill.loss.mmd_stages leaves it out and DMD, "
                         "GAN and the regressions are off; add the stage to mmd_stages, or turn on DMD or GAN")
    weights = {"mmd": cfg.mmd_weight, "dmd": cfg.dmd_weight, "gan": cfg.gan_weight, "teacher_regression": cfg.teacher_regression_weight,
               "real_regression": cfg.real_regression_weight, "self_guidance": cfg.self_guidance_weight}
    return sum(weights[k] * v for k, v in losses.items())

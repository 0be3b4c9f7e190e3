"""One distillation iteration (spec section 5): ``critic.updates`` critic updates, then one
generator update, each a backward, a clip and an optimizer step. Shared by the trainer and
``swd bench``.

A NaN/Inf loss raises before any weight moves, and the verdict is shared across processes, so no
process waits in a gradient all-reduce that the others never join.
"""

from __future__ import annotations

import dataclasses

import torch
from accelerate import Accelerator

from ..config import DistillConfig, OptimConfig
from ..schedule import ScaleSchedule
from ..train.checkpoints import check_finite
from .noise import BatchNoise
from .objective import critic_losses, critic_samples, critic_total, generator_losses, generator_total
from .stage import LossContext, simulated_inputs
from .views import DistillModels, Roles


def adamw(params: list, lr: float, cfg: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, eps=cfg.eps)


def check_backward_simulation(share: float) -> None:
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"distill.backward_simulation is the share of steps whose stage input comes from the student's own "
                         f"earlier stages and must lie in [0, 1] (0: the real images' inputs), got {share}")


def simulate_stage(accelerator: Accelerator, models: DistillModels, roles: Roles, ctx: LossContext, schedule: ScaleSchedule,
                   noise: BatchNoise, cfg: DistillConfig, upsample_mode: str) -> LossContext:
    """``ctx``, with its stage input made by the student's own earlier stages on a
    ``cfg.backward_simulation`` share of the steps (:func:`swd.distill.stage.simulated_inputs`)."""
    if cfg.backward_simulation <= 0 or not noise.coin(cfg.backward_simulation):
        return ctx
    models.set_phase("critic")  # the student frozen, as for the critic's samples
    with accelerator.autocast():
        inputs = simulated_inputs(roles.student_samples, ctx.inputs, schedule, ctx.student_cond, noise, upsample_mode)
    return dataclasses.replace(ctx, inputs=inputs)


def iteration(accelerator: Accelerator, models: DistillModels, roles: Roles, optimizers: tuple, params: tuple,
              ctx: LossContext, noise: BatchNoise, cfg: DistillConfig, step: int) -> dict[str, torch.Tensor]:
    """One generator update preceded by ``cfg.critic.updates`` critic updates (if there is a critic).

    ``roles``: how each part is reached (the trained ones possibly DDP-wrapped, or all of them
    roles of one FSDP module; :class:`swd.distill.views.Roles`); returns the last losses.
    """
    opt_g, opt_c = optimizers
    student_params, critic_params = params
    stage = ctx.inputs.stage
    logs: dict[str, torch.Tensor] = {}
    if roles.critic is not None:
        models.set_phase("critic")
        with accelerator.autocast():  # the student is frozen through the critic updates: their samples in one forward
            samples = critic_samples(roles.student_samples, ctx, noise, cfg.critic.updates)
        for x0_hat in samples:
            with accelerator.autocast():
                losses = critic_losses(roles.critic, x0_hat, ctx, noise, cfg.loss)
            update(accelerator, losses, critic_total(losses, cfg.loss), "critic_total", critic_params, opt_c, cfg.optim.grad_clip, step, stage)
        logs.update(losses)
    models.set_phase("generator")
    with accelerator.autocast():
        losses = generator_losses(roles.student, roles.teacher, roles.critic_frozen, roles.features, ctx, noise, cfg.loss)
    update(accelerator, losses, generator_total(losses, cfg.loss), "generator_total", student_params, opt_g, cfg.optim.grad_clip, step, stage)
    logs.update(losses)
    return logs


def update(accelerator: Accelerator, losses: dict, total: torch.Tensor, total_name: str, params: list, optimizer,
           grad_clip: float, step: int, stage: int) -> None:
    """Backward, clip, step, zero; a NaN/Inf loss raises (naming it) before any weight moves.

    The verdict is shared: if any process sees a non-finite loss, every process raises.
    """
    named = {**losses, total_name: total}
    local_bad = torch.stack([~torch.isfinite(v.detach()).all() for v in named.values()]).any()
    if accelerator.reduce(local_bad.float().reshape(1), "sum").item() > 0:
        check_finite(named, step, stage)  # raises here, naming the loss, if this process saw it
        raise FloatingPointError(f"a loss is NaN/Inf on another process at step {step}, stage {stage}; the last complete checkpoint is kept")
    accelerator.backward(total)
    if grad_clip > 0:
        accelerator.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

"""Distillation: stage inputs, one frozen base with two adapters, which weights each phase moves."""

import torch
import pytest

from swd.config import DistillConfig
from swd.distill.inputs import check_index_range, loss_grid, stage_inputs, stage_of, training_schedule
from swd.distill.models import CRITIC, STUDENT, build_distill_models, use_adapter
from swd.distill.step import BatchNoise, LossContext, critic_losses, critic_total, generator_losses, generator_total
from swd.models import build_denoiser
from swd.schedule import ScaleSchedule, downsample, upsample

SCHEDULE = ScaleSchedule([16, 20, 24, 32], [1.0, 0.8959, 0.7371, 0.6022, 0.0])


def images(n=4, seed=0):
    return torch.rand(n, 1, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_stages_rotate_round_robin():
    assert [stage_of(s, 4) for s in range(9)] == [0, 1, 2, 3, 0, 1, 2, 3, 0]


def test_stage_inputs_follow_the_worked_example():
    x = images()
    for stage, (size, prev) in enumerate([(16, 16), (20, 16), (24, 20), (32, 24)]):
        eps = torch.randn(4, 1, size, size)
        inp = stage_inputs(x, SCHEDULE, stage, eps)
        sigma = SCHEDULE.sigmas[stage]
        assert inp.target.shape == (4, 1, size, size)
        assert torch.allclose(inp.target, downsample(x, size))  # area-downscaled target
        previous = upsample(downsample(x, prev), size, "bicubic")  # clean previous size, upsampled bicubic
        assert torch.allclose(inp.x_t, (1 - sigma) * previous + sigma * eps, atol=1e-6)  # then noised
        assert torch.all(inp.sigma == sigma)
    with pytest.raises(ValueError, match="noise shape"):
        stage_inputs(x, SCHEDULE, 1, torch.randn(4, 1, 16, 16))


def test_fullres_mode_keeps_every_stage_at_the_final_size():
    sched = training_schedule(SCHEDULE, "fullres")
    assert sched.sizes == ((32, 32),) * 4 and sched.sigmas == SCHEDULE.sigmas
    with pytest.raises(ValueError, match="distill.mode"):
        training_schedule(SCHEDULE, "pyramid")


def test_loss_grid_and_index_ranges():
    grid = loss_grid(28, 3.0)
    assert len(grid) == 28 and grid[0] == 1.0 and abs(float(grid[18]) - 0.6022) < 1e-4
    assert check_index_range("mmd_indices", [18, 27], 28) == (18, 27)
    with pytest.raises(ValueError, match="mmd_indices"):
        check_index_range("mmd_indices", [18, 28], 28)


def tiny_teacher(tiny_model_config):
    torch.manual_seed(0)
    return build_denoiser(tiny_model_config)


def cfg(**kw):
    base = dict(lora_rank=4, batch_size=4, critic_updates=1, lr=1e-2, critic_lr=1e-2)
    base.update(kw)
    return DistillConfig(**base)


def test_one_base_two_adapters(tiny_model_config):
    teacher = tiny_teacher(tiny_model_config)
    base_ids = {id(p) for p in teacher.parameters()}
    models = build_distill_models(teacher, cfg())
    assert models.student.denoiser is teacher and models.critic.denoiser is teacher
    assert set(teacher.transformer.peft_config) == {STUDENT, CRITIC}
    assert models.critic.head is not None
    lora = sum(p.numel() for p in models.student.trainable_parameters()) + sum(p.numel() for p in models.critic.trainable_parameters())
    assert models.parameters_held() == sum(p.numel() for p in teacher.parameters()) + sum(p.numel() for p in models.critic.head.parameters())
    assert lora < models.parameters_held()
    assert all(not p.requires_grad for n, p in teacher.named_parameters() if "lora_" not in n)
    assert base_ids <= {id(p) for p in teacher.parameters()}


def test_use_adapter_keeps_requires_grad_flags(tiny_model_config):
    models = build_distill_models(tiny_teacher(tiny_model_config), cfg())
    models.set_phase("generator")
    before = [p.requires_grad for p in models.base.parameters()]
    for name in (CRITIC, None, STUDENT):
        use_adapter(models.base.transformer, name)
        assert [p.requires_grad for p in models.base.parameters()] == before


def test_mmd_only_builds_no_critic(tiny_model_config):
    teacher = tiny_teacher(tiny_model_config)
    models = build_distill_models(teacher, cfg(dmd_weight=0.0, gan_weight=0.0))
    assert models.critic is None
    assert set(teacher.transformer.peft_config) == {STUDENT}
    assert models.features.adapter is None  # features come from the teacher itself


def test_invalid_configs_fail_before_training(tiny_model_config):
    with pytest.raises(ValueError, match="lora_rank"):
        build_distill_models(tiny_teacher(tiny_model_config), cfg(lora_rank=0))
    with pytest.raises(ValueError, match="every generator loss weight is 0"):
        build_distill_models(tiny_teacher(tiny_model_config), cfg(mmd_weight=0.0, dmd_weight=0.0, gan_weight=0.0))
    with pytest.raises(ValueError, match="feature_block"):
        build_distill_models(tiny_teacher(tiny_model_config), cfg(feature_block=9))


def context(models, stage=3, n=4):
    noise = BatchNoise(0, 0, n, 0, 1, torch.device("cpu"))
    size = SCHEDULE.sizes[stage]
    inp = stage_inputs(images(n), SCHEDULE, stage, noise.randn(1, *size))
    labels = torch.arange(n) % 10
    with torch.no_grad():
        cond, null = models.base.condition(labels), models.base.null_condition(n)
    student_cond = labels if models.student.owns_conditioner else cond
    ranges = {"dmd": (12, 27), "mmd": (18, 27), "critic": (0, 27)}
    return LossContext(inp, cond, null, student_cond, loss_grid(), ranges), noise


def snapshot(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def changed(before, module):
    return {n for n, p in module.named_parameters() if not torch.equal(before[n], p.detach())}


def phase_step(models, phase, c, ctx, noise):
    """One optimizer step of ``phase``; returns the names of parameters that moved, per module."""
    models.set_phase(phase)
    view = models.critic if phase == "critic" else models.student
    opt = torch.optim.SGD(view.trainable_parameters(), lr=1.0)
    modules = {"base": models.base, "head": models.critic.head, "student_copy": models.student.denoiser}
    before = {k: snapshot(m) for k, m in modules.items()}
    if phase == "critic":
        loss = critic_total(critic_losses(models.critic, models.student, ctx, noise, c), c)
    else:
        loss = generator_total(generator_losses(models.student, models.base, models.critic, models.features, ctx, noise, c), c)
    loss.backward()
    opt.step()
    opt.zero_grad()
    return {k: changed(before[k], m) for k, m in modules.items()}


def test_generator_step_moves_only_student_lora_and_critic_step_only_critic(tiny_model_config):
    c = cfg()
    models = build_distill_models(tiny_teacher(tiny_model_config), c)
    ctx, noise = context(models)
    moved = phase_step(models, "generator", c, ctx, noise)
    assert moved["base"] and all(f".{STUDENT}." in n for n in moved["base"]), moved["base"]
    assert not moved["head"]
    moved = phase_step(models, "critic", c, ctx, noise)
    assert moved["base"] and all(f".{CRITIC}." in n for n in moved["base"]), moved["base"]
    assert moved["head"]  # the GAN head trains with the critic


def test_full_student_trains_its_copy_only(tiny_model_config):
    c = cfg(student="full")
    models = build_distill_models(tiny_teacher(tiny_model_config), c)
    assert models.student.denoiser is not models.base
    ctx, noise = context(models)
    moved = phase_step(models, "generator", c, ctx, noise)
    assert moved["student_copy"] and not moved["base"] and not moved["head"]
    moved = phase_step(models, "critic", c, ctx, noise)
    assert not moved["student_copy"] and all(f".{CRITIC}." in n for n in moved["base"])


def test_teacher_unchanged_by_distillation_steps(tiny_model_config):
    teacher = tiny_teacher(tiny_model_config)
    models = build_distill_models(teacher, cfg())
    base = {n: p.detach().clone() for n, p in teacher.named_parameters() if "lora_" not in n}
    ctx, noise = context(models)
    for phase in ("critic", "generator", "critic", "generator"):
        models.set_phase(phase)
        view = models.critic if phase == "critic" else models.student
        opt = torch.optim.Adam(view.trainable_parameters(), lr=0.1)
        if phase == "critic":
            loss = critic_total(critic_losses(models.critic, models.student, ctx, noise, cfg()), cfg())
        else:
            loss = generator_total(generator_losses(models.student, models.base, models.critic, models.features, ctx, noise, cfg()), cfg())
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(torch.equal(base[n], p) for n, p in teacher.named_parameters() if "lora_" not in n)
    # and the teacher's output is still the original model's: adapters off
    use_adapter(teacher.transformer, None)
    fresh = tiny_teacher(tiny_model_config)
    x, s = torch.randn(2, 1, 16, 16), torch.full((2,), 0.5)
    with torch.no_grad():
        assert torch.allclose(teacher(x, s, torch.tensor([1, 2])), fresh(x, s, torch.tensor([1, 2])), atol=1e-6)


@pytest.mark.parametrize("weights", [dict(dmd_weight=0.0, gan_weight=0.0), dict(mmd_weight=0.0, gan_weight=0.0), dict(mmd_weight=0.0, dmd_weight=0.0), dict()])
def test_any_subset_of_losses_runs(tiny_model_config, weights):
    c = cfg(**weights)
    models = build_distill_models(tiny_teacher(tiny_model_config), c)
    ctx, noise = context(models, stage=1)
    losses = generator_losses(models.student, models.base, models.critic, models.features, ctx, noise, c)
    expected = {k for k, w in {"mmd": c.mmd_weight, "dmd": c.dmd_weight, "gan": c.gan_weight}.items() if w > 0}
    assert set(losses) == expected
    generator_total(losses, c).backward()
    if models.critic is not None:
        models.set_phase("critic")
        closs = critic_losses(models.critic, models.student, ctx, noise, c)
        assert ("critic_gan" in closs) == (c.gan_weight > 0)
        critic_total(closs, c).backward()


def test_batch_noise_slices_the_global_batch():
    whole = BatchNoise(3, 7, 8, 0, 1, torch.device("cpu"))
    halves = [BatchNoise(3, 7, 8, r, 2, torch.device("cpu")) for r in range(2)]
    a = whole.randn(1, 4, 4)
    assert torch.equal(torch.cat([h.randn(1, 4, 4) for h in halves]), a)
    grid = loss_grid()
    b = whole.grid_sigmas(grid, 12, 27)
    assert torch.equal(torch.cat([h.grid_sigmas(grid, 12, 27) for h in halves]), b)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_model_config):
    """Checkpointed views recompute with their own adapter, even though adapters switch between forwards."""
    grads = []
    for enabled in (False, True):
        c = cfg()
        models = build_distill_models(tiny_teacher(tiny_model_config), c)
        # make both adapters non-trivial so that using the wrong one during recomputation would show
        with torch.no_grad():
            for n, p in models.base.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(n)))
        for view in (models.student, models.critic, models.features):
            view.checkpointing = enabled
        ctx, noise = context(models)
        loss = generator_total(generator_losses(models.student, models.base, models.critic, models.features, ctx, noise, c), c)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in models.base.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-6, msg=n)


def test_nan_loss_stops_before_any_weight_moves():
    from accelerate import Accelerator

    from swd.distill.trainer import _update

    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([p], lr=1.0)
    loss = (p * float("nan")).sum()
    with pytest.raises(FloatingPointError, match=r"'dmd'.*step 7, stage 2"):
        _update(Accelerator(cpu=True), {"dmd": loss}, loss, "generator_total", [p], opt, 10.0, step=7, stage=2)
    assert torch.equal(p.detach(), torch.ones(3))

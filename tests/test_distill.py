"""Distillation: stage inputs, one frozen base with two adapters, which weights each phase moves."""

import torch
import pytest

from conftest import distill_config
from swd.distill.adapters import use_adapter
from swd.distill.dmd import self_guidance_loss
from swd.distill.noise import BatchNoise, NoiseLevels, check_index_range, loss_grid, ode_sigmas
from swd.distill.objective import critic_losses, critic_samples, critic_total, generator_losses, generator_total, teacher_solution
from swd.distill.stage import LossContext, simulated_inputs, stage_inputs, stage_of, training_schedule
from swd.distill.trainer import check_mmd_stages
from swd.distill.views import Roles, build_distill_models, guidance_of_losses
from swd.student import CRITIC, STUDENT
from swd.models import build_denoiser
from swd.sampling import sample_euler
from swd.schedule import ScaleSchedule, add_noise, clean_from_velocity, downsample, euler_step_x0, upsample

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
    with pytest.raises(ValueError, match="distill.noise.mmd_indices"):
        check_index_range("mmd_indices", [18, 28], 28)
    levels = NoiseLevels.from_config(distill_config().noise)
    assert levels.ranges == {"dmd": (12, 27), "mmd": (18, 27), "critic": (0, 27)} and torch.equal(levels.grid, grid)
    with pytest.raises(ValueError, match=r"distill.noise.dmd_indices must be \[first, last\]"):
        NoiseLevels.from_config(distill_config("noise.dmd_indices=[20, 12]").noise)
    noise = BatchNoise(0, 0, 64, 0, 1, torch.device("cpu"))
    drawn = levels.draw("mmd", noise)
    assert drawn.shape == (64,) and float(drawn.max()) <= float(grid[18]) and float(drawn.min()) >= float(grid[27])


def tiny_teacher(tiny_model_config):
    torch.manual_seed(0)
    return build_denoiser(tiny_model_config)


def one_critic_loss(models, ctx, noise, c):
    """The losses of one critic update on a fresh student sample (what the trainer does per update)."""
    return critic_losses(models.critic, critic_samples(models.student, ctx, noise, 1)[0], ctx, noise, c.loss)


def cfg(*overrides: str):
    return distill_config("lora.rank=4", "batch_size=4", "critic.updates=1", "optim.lr=1e-2", "optim.critic_lr=1e-2", *overrides)


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
    models = build_distill_models(teacher, cfg("loss.dmd_weight=0", "loss.gan_weight=0"))
    assert models.critic is None
    assert set(teacher.transformer.peft_config) == {STUDENT}
    assert models.features.adapter is None  # features come from the teacher itself


def test_invalid_configs_fail_before_training(tiny_model_config):
    with pytest.raises(ValueError, match="lora.rank"):
        build_distill_models(tiny_teacher(tiny_model_config), cfg("lora.rank=0"))
    with pytest.raises(ValueError, match="every generator loss weight is 0"):
        build_distill_models(tiny_teacher(tiny_model_config), cfg("loss.mmd_weight=0", "loss.dmd_weight=0", "loss.gan_weight=0"))
    with pytest.raises(ValueError, match="real_regression_weight must be >= 0"):
        build_distill_models(tiny_teacher(tiny_model_config), cfg("loss.real_regression_weight=-1"))
    with pytest.raises(ValueError, match="feature_block"):
        build_distill_models(tiny_teacher(tiny_model_config), cfg("critic.feature_block=9"))
    with pytest.raises(ValueError, match="unknown distill.distributed 'zero'; use 'ddp' or 'fsdp'"):
        build_distill_models(tiny_teacher(tiny_model_config), cfg("distributed=zero"))
    with pytest.raises(ValueError, match="needs distill.student=lora"):
        build_distill_models(tiny_teacher(tiny_model_config), cfg("distributed=fsdp", "student=full"))
    with pytest.raises(ValueError, match="ema_decay is not wired for distill.distributed=fsdp"):
        build_distill_models(tiny_teacher(tiny_model_config), cfg("distributed=fsdp", "ema_decay=0.99"))
    with pytest.raises(ValueError, match=r"ema_decay must lie in \(0, 1\)"):
        build_distill_models(tiny_teacher(tiny_model_config), cfg("ema_decay=0"))
    with pytest.raises(ValueError, match="'no' or 'bf16'"):
        build_distill_models(tiny_teacher(tiny_model_config), cfg("distributed=fsdp", "mixed_precision=fp16"))


def context(models, stage=3, n=4):
    noise = BatchNoise(0, 0, n, 0, 1, torch.device("cpu"))
    size = SCHEDULE.sizes[stage]
    inp = stage_inputs(images(n), SCHEDULE, stage, noise.randn(1, *size))
    labels = torch.arange(n) % 10
    with torch.no_grad():
        cond, null = models.base.condition(labels), models.base.null_condition(n)
    student_cond = labels if models.student.owns_conditioner else cond
    levels = NoiseLevels(loss_grid(), {"dmd": (12, 27), "mmd": (18, 27), "critic": (0, 27)})
    return LossContext(inp, cond, null, student_cond, levels), noise


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
        loss = critic_total(one_critic_loss(models, ctx, noise, c), c.loss)
    else:
        loss = generator_total(generator_losses(models.student, models.teacher, models.critic, models.features, ctx, noise, c.loss), c.loss)
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
    c = cfg("student=full")
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
            loss = critic_total(one_critic_loss(models, ctx, noise, cfg()), cfg().loss)
        else:
            loss = generator_total(generator_losses(models.student, models.teacher, models.critic, models.features, ctx, noise, cfg().loss), cfg().loss)
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


@pytest.mark.parametrize("weights", [("dmd_weight=0", "gan_weight=0"), ("mmd_weight=0", "gan_weight=0"), ("mmd_weight=0", "dmd_weight=0"), ()])
def test_any_subset_of_losses_runs(tiny_model_config, weights):
    c = cfg(*(f"loss.{w}" for w in weights))
    models = build_distill_models(tiny_teacher(tiny_model_config), c)
    ctx, noise = context(models, stage=1)
    losses = generator_losses(models.student, models.teacher, models.critic, models.features, ctx, noise, c.loss)
    expected = {k for k, w in {"mmd": c.loss.mmd_weight, "dmd": c.loss.dmd_weight, "gan": c.loss.gan_weight}.items() if w > 0}
    assert set(losses) == expected
    generator_total(losses, c.loss).backward()
    if models.critic is not None:
        models.set_phase("critic")
        closs = one_critic_loss(models, ctx, noise, c)
        assert ("critic_gan" in closs) == (c.loss.gan_weight > 0)
        critic_total(closs, c.loss).backward()


def test_teacher_regression_is_the_mse_to_the_guided_teacher_from_the_students_input(tiny_model_config):
    c = cfg("loss.teacher_regression_weight=2.0", "loss.dmd_weight=0", "loss.gan_weight=0", "loss.mmd_weight=0",
            "loss.dmd_guidance=3.0")
    models = build_distill_models(tiny_teacher(tiny_model_config), c)
    ctx, noise = context(models, stage=2)
    losses = generator_losses(models.student, models.teacher, None, models.features, ctx, noise, c.loss)
    assert set(losses) == {"teacher_regression"}
    inp = ctx.inputs
    with torch.no_grad():
        x0_hat = models.student(inp.x_t, inp.sigma, ctx.student_cond)
        guided = models.teacher(inp.x_t, inp.sigma, ctx.cond, ctx.null, 3.0)
        unguided = models.teacher(inp.x_t, inp.sigma, ctx.cond, ctx.null, 1.0)
    assert torch.allclose(losses["teacher_regression"], ((x0_hat - guided) ** 2).mean(), rtol=1e-5)
    assert not torch.allclose(guided, unguided, atol=1e-4)  # the target is the guided prediction, not the conditional one
    assert torch.allclose(generator_total(losses, c.loss), 2.0 * losses["teacher_regression"])
    generator_total(losses, c.loss).backward()
    assert all(p.grad is not None for p in models.student.trainable_parameters())


@pytest.mark.parametrize("stage", [0, 2])
def test_real_regression_is_the_mse_to_the_stages_own_real_image(tiny_model_config, stage):
    c = cfg("loss.real_regression_weight=0.5", "loss.dmd_weight=0", "loss.gan_weight=0", "loss.mmd_weight=0")
    models = build_distill_models(tiny_teacher(tiny_model_config), c)
    ctx, noise = context(models, stage=stage)
    losses = generator_losses(models.student, models.teacher, None, models.features, ctx, noise, c.loss)
    assert set(losses) == {"real_regression"}
    inp = ctx.inputs
    with torch.no_grad():
        x0_hat = models.student(inp.x_t, inp.sigma, ctx.student_cond)
    assert torch.allclose(losses["real_regression"], ((x0_hat - inp.target) ** 2).mean(), rtol=1e-5)
    assert not torch.allclose(losses["real_regression"], ((x0_hat - inp.target.flip(0)) ** 2).mean(), rtol=1e-3)  # paired, per image
    assert torch.allclose(generator_total(losses, c.loss), 0.5 * losses["real_regression"])
    generator_total(losses, c.loss).backward()
    assert all(p.grad is not None for p in models.student.trainable_parameters())


def test_self_guidance_pushes_the_conditional_x0_along_the_students_own_guidance_direction(tiny_model_config):
    c = cfg("loss.self_guidance_weight=1.0", "loss.self_guidance_scale=3.0", "loss.self_guidance_stages=[2]", "loss.dmd_weight=0",
            "loss.gan_weight=0", "loss.mmd_weight=0", "loss.real_regression_weight=1.0")
    models = build_distill_models(tiny_teacher(tiny_model_config), c)
    with torch.no_grad():  # a trained-looking student: adapters away from zero, so cond and null differ
        for p in models.student.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    ctx, noise = context(models, stage=2)
    assert guidance_of_losses(c.loss) == 3.0  # the null condition is made for self guidance although DMD is off
    assert guidance_of_losses(cfg("loss.self_guidance_weight=1.0", "loss.dmd_guidance=1.0").loss) == 2.0  # DMD unguided: still made
    assert guidance_of_losses(cfg("loss.dmd_guidance=4.0", "loss.self_guidance_weight=1.0").loss) == 4.0  # DMD's own guidance first
    losses = generator_losses(models.student, models.teacher, None, models.features, ctx, noise, c.loss)
    assert set(losses) == {"real_regression", "self_guidance"}
    inp = ctx.inputs
    x0 = models.student(inp.x_t, inp.sigma, ctx.student_cond).detach().requires_grad_(True)
    with torch.no_grad():
        x0_null = models.student(inp.x_t, inp.sigma, ctx.null)
    assert (x0 - x0_null).abs().max() > 1e-4
    self_guidance_loss(x0, x0_null, 3.0).sum().backward()
    d = x0[0].numel()
    torch.testing.assert_close(x0.grad, -(3.0 - 1.0) * (x0.detach() - x0_null) / d)  # a step along cond - null
    torch.testing.assert_close(losses["self_guidance"], self_guidance_loss(x0.detach(), x0_null, 3.0).mean())
    ctx1, _ = context(models, stage=1)  # not a listed stage
    assert "self_guidance" not in generator_losses(models.student, models.teacher, None, models.features, ctx1, noise, c.loss)
    for bad, match in (("loss.self_guidance_scale=1.0", "is no guidance"), ("student=full", "needs distill.student=lora"),
                       ("loss.self_guidance_weight=-1", "self_guidance_weight must be >= 0")):
        with pytest.raises(ValueError, match=match):
            build_distill_models(tiny_teacher(tiny_model_config), cfg("loss.self_guidance_weight=1.0", bad))


def test_mmd_stages_leave_the_mmd_term_out_of_the_other_stages(tiny_model_config):
    c = cfg("loss.mmd_stages=[1,2,3]")
    models = build_distill_models(tiny_teacher(tiny_model_config), c)
    for stage, expected in ((0, {"dmd", "gan"}), (1, {"mmd", "dmd", "gan"})):
        ctx, noise = context(models, stage=stage)
        losses = generator_losses(models.student, models.teacher, models.critic, models.features, ctx, noise, c.loss)
        assert set(losses) == expected
        generator_total(losses, c.loss).backward()


def test_mmd_stages_are_checked_against_the_schedule():
    check_mmd_stages(cfg("loss.mmd_stages=[1,3]").loss, 4)
    with pytest.raises(ValueError, match="stage 4 is not one of the schedule's stages 0..3"):
        check_mmd_stages(cfg("loss.mmd_stages=[1,4]").loss, 4)
    with pytest.raises(ValueError, match=r"self_guidance_stages \[5\]: stage 5 is not one of the schedule's stages 0..3"):
        check_mmd_stages(cfg("loss.self_guidance_stages=[5]").loss, 4)
    with pytest.raises(ValueError, match="leaves out stage 0, and MMD is the only loss"):
        check_mmd_stages(cfg("loss.mmd_stages=[1,2,3]", "loss.dmd_weight=0", "loss.gan_weight=0").loss, 4)
    with pytest.raises(ValueError, match="the generator loss has no term at this stage"):
        generator_total({}, cfg("loss.mmd_stages=[1,2,3]", "loss.dmd_weight=0", "loss.gan_weight=0").loss)


def test_backward_simulation_builds_the_input_from_the_students_own_earlier_stages():
    cond = torch.tensor([0.1, -0.2, 0.3, 0.0])

    def student(x, sigma, c):  # any frozen x0 predictor that reads its input, its sigma and its condition
        return 0.5 * x * (1 - sigma.view(-1, 1, 1, 1)) + c.view(-1, 1, 1, 1)

    real = stage_inputs(images(), SCHEDULE, 2, torch.randn(4, 1, 24, 24))
    got = simulated_inputs(student, real, SCHEDULE, cond, BatchNoise(0, 5, 4, 0, 1, torch.device("cpu")))
    # by hand, drawing the same noise in the same order: stage 0 from pure noise, stage 1 from its upsampled
    # prediction noised to sigma_1, then stage 1's prediction upsampled to stage 2's size and noised to sigma_2
    noise = BatchNoise(0, 5, 4, 0, 1, torch.device("cpu"))
    s0, s1 = (torch.full((4,), SCHEDULE.sigmas[i]) for i in (0, 1))
    x0 = student(noise.randn(1, 16, 16), s0, cond)
    x1 = add_noise(upsample(x0, 20), noise.randn(1, 20, 20), s1)
    previous = upsample(student(x1, s1, cond), 24)
    torch.testing.assert_close(got.previous, previous)
    torch.testing.assert_close(got.x_t, add_noise(previous, noise.randn(1, 24, 24), real.sigma))
    assert torch.equal(got.target, real.target) and torch.equal(got.sigma, real.sigma) and got.stage == 2
    assert not torch.allclose(got.x_t, real.x_t, atol=0.1)  # not the real image's input
    first = stage_inputs(images(), SCHEDULE, 0, torch.randn(4, 1, 16, 16))
    assert simulated_inputs(student, first, SCHEDULE, cond, noise) is first  # pure noise either way


def test_batch_noise_coin_is_one_draw_shared_by_every_process():
    draws = [[BatchNoise(3, step, 8, r, 2, torch.device("cpu")).coin(0.5) for r in range(2)] for step in range(40)]
    assert all(a == b for a, b in draws)
    assert 5 < sum(a for a, _ in draws) < 35  # both outcomes occur
    assert not BatchNoise(3, 0, 8, 0, 1, torch.device("cpu")).coin(0.0)
    assert BatchNoise(3, 0, 8, 0, 1, torch.device("cpu")).coin(1.0)


def test_batch_noise_slices_the_global_batch():
    whole = BatchNoise(3, 7, 8, 0, 1, torch.device("cpu"))
    halves = [BatchNoise(3, 7, 8, r, 2, torch.device("cpu")) for r in range(2)]
    a = whole.randn(1, 4, 4)
    assert torch.equal(torch.cat([h.randn(1, 4, 4) for h in halves]), a)
    grid = loss_grid()
    b = whole.grid_sigmas(grid, 12, 27)
    assert torch.equal(torch.cat([h.grid_sigmas(grid, 12, 27) for h in halves]), b)


def test_nan_loss_stops_before_any_weight_moves():
    from accelerate import Accelerator

    from swd.distill.iteration import update

    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([p], lr=1.0)
    loss = (p * float("nan")).sum()
    with pytest.raises(FloatingPointError, match=r"'dmd'.*step 7, stage 2"):
        update(Accelerator(cpu=True), {"dmd": loss}, loss, "generator_total", [p], opt, 10.0, step=7, stage=2)
    assert torch.equal(p.detach(), torch.ones(3))


def nontrivial_adapters(models, scale=0.05):
    """LoRA B is zero at init; random B makes the student, the critic and the teacher differ."""
    with torch.no_grad():
        for n, p in models.base.named_parameters():
            if "lora_B" in n:
                p.normal_(0, scale, generator=torch.Generator().manual_seed(len(n)))


def critic_grads(models):
    return {n: p.grad.clone() for n, p in models.critic.named_parameters() if p.grad is not None}


def test_features_only_equals_the_full_forward_and_stops_at_the_feature_block(tiny_model_config):
    c = cfg()
    models = build_distill_models(tiny_teacher(tiny_model_config), c)
    nontrivial_adapters(models)
    models.set_phase("critic")
    critic, denoiser = models.critic, models.base
    assert critic.feature_block == 1 and len(denoiser.blocks) == 2  # so a later block exists to skip
    x = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    sigma, cond = torch.tensor([0.3, 0.6, 0.9]), denoiser.condition(torch.tensor([1, 2, 3]))
    weight = torch.randn(3, 64, 16, generator=torch.Generator().manual_seed(2))
    results = []
    for early in (False, True):
        xg = x.clone().requires_grad_(True)
        ran = []
        handle = denoiser.transformer.proj_out.register_forward_hook(lambda *_: ran.append("proj_out"))
        if early:
            features = critic.features_only(xg, sigma, cond)
        else:
            features = critic(xg, sigma, cond).features
        handle.remove()
        assert ran == ([] if early else ["proj_out"])  # the output layer never runs after an early exit
        (features * weight).sum().backward()
        results.append((features.detach(), xg.grad.clone(), critic_grads(models)))
        models.critic.zero_grad(set_to_none=True)
    (f_full, gx_full, g_full), (f_early, gx_early, g_early) = results
    torch.testing.assert_close(f_early, f_full, rtol=0, atol=1e-6)
    torch.testing.assert_close(gx_early, gx_full, rtol=1e-5, atol=1e-7)
    assert g_full.keys() == g_early.keys() and any("lora_" in n for n in g_full)
    for n in g_full:
        torch.testing.assert_close(g_early[n], g_full[n], rtol=1e-5, atol=1e-7, msg=n)
    assert all(len(b._forward_hooks) == 0 for b in denoiser.blocks)


def test_critic_with_real_inputs_equals_one_forward_on_fake_and_real(tiny_model_config):
    """The critic update's real half now stops at the feature block; losses and gradients stay those of
    the previous single forward on [fake; real]."""
    c = cfg()
    models = build_distill_models(tiny_teacher(tiny_model_config), c)
    nontrivial_adapters(models)
    models.set_phase("critic")
    critic, denoiser = models.critic, models.base
    gen = torch.Generator().manual_seed(3)
    fake, real = torch.randn(4, 1, 20, 20, generator=gen), torch.randn(4, 1, 20, 20, generator=gen)
    sigma, cond = torch.tensor([0.2, 0.5, 0.7, 1.0]), denoiser.condition(torch.tensor([0, 1, 2, 3]))
    target = torch.randn(4, 1, 20, 20, generator=gen)

    out = critic(fake, sigma, cond, real=real)
    loss = (out.x0 - target).pow(2).mean() + (out.logits.sigmoid() - out.real_logits).pow(2).mean()
    loss.backward()
    new = (out.x0.detach(), out.logits.detach(), out.real_logits.detach(), critic_grads(models))
    models.critic.zero_grad(set_to_none=True)

    both = critic(torch.cat([fake, real]), torch.cat([sigma, sigma]), cond.cat(cond))  # the old way: 2B, full forward
    x0, logits = both.x0[:4], both.logits
    loss = (x0 - target).pow(2).mean() + (logits[:4].sigmoid() - logits[4:]).pow(2).mean()
    loss.backward()
    old = (x0.detach(), logits[:4].detach(), logits[4:].detach(), critic_grads(models))

    for a, b in zip(new[:3], old[:3]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert new[3].keys() == old[3].keys() and any("head" in n for n in new[3])
    for n in old[3]:
        torch.testing.assert_close(new[3][n], old[3][n], rtol=1e-4, atol=1e-6, msg=n)
    with pytest.raises(ValueError, match="no GAN head"):
        models.features.__class__(denoiser, None, None, 1)(fake, sigma, cond, real=real)


def test_frozen_critic_without_x0_grad_gives_the_same_x0_and_logit_gradients(tiny_model_config):
    """The generator update's critic forward (DMD's fake score, GAN logits) runs the blocks after the
    feature block outside autograd: same x0 and logits, same gradient reaching the input."""
    models = build_distill_models(tiny_teacher(tiny_model_config), cfg())
    nontrivial_adapters(models)
    models.set_phase("generator")
    critic, denoiser = models.critic, models.base
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 1, 16, 16, generator=gen)
    sigma, cond = torch.tensor([0.3, 0.6, 0.9]), denoiser.condition(torch.tensor([1, 2, 3]))
    results = []
    for x0_grad in (True, False):
        xg = x.clone().requires_grad_(True)
        out = critic(xg, sigma, cond, x0_grad=x0_grad)
        out.logits.sum().backward()
        results.append((out.x0.detach(), out.logits.detach(), xg.grad.clone()))
        if not x0_grad:  # x0 = x - sigma * v: only the identity path to x is left, v carries no graph
            v_graph = torch.autograd.grad(out.x0.sum(), xg)[0]
            torch.testing.assert_close(v_graph, torch.ones_like(x))
    (x0_a, logits_a, gx_a), (x0_b, logits_b, gx_b) = results
    torch.testing.assert_close(x0_b, x0_a, rtol=0, atol=0)
    torch.testing.assert_close(logits_b, logits_a, rtol=0, atol=0)
    torch.testing.assert_close(gx_b, gx_a, rtol=1e-5, atol=1e-7)
    assert all(len(b._forward_hooks) == 0 for b in denoiser.blocks)


def test_use_adapter_skips_when_active_keeps_flags_and_switches_when_needed(tiny_model_config, monkeypatch):
    from peft.tuners.tuners_utils import BaseTunerLayer

    from swd.distill.adapters import active_adapter

    models = build_distill_models(tiny_teacher(tiny_model_config), cfg())
    nontrivial_adapters(models)
    transformer = models.base.transformer
    x, s, labels = torch.randn(2, 1, 16, 16), torch.full((2,), 0.5), torch.tensor([1, 2])
    outputs = {}
    with torch.no_grad():
        for name in (STUDENT, CRITIC, None):
            use_adapter(transformer, name)
            assert active_adapter(transformer) == name
            outputs[name] = models.base(x, s, labels)
    assert not torch.allclose(outputs[STUDENT], outputs[CRITIC]) and not torch.allclose(outputs[None], outputs[CRITIC])

    # an unusual flag pattern survives both a skipped and a real switch
    params = list(models.base.parameters())
    for i, p in enumerate(params):
        p.requires_grad_(i % 3 == 0)
    flags = [p.requires_grad for p in params]
    calls = []
    monkeypatch.setattr(BaseTunerLayer, "set_adapter", lambda self, *a, _orig=BaseTunerLayer.set_adapter, **k: calls.append(1) or _orig(self, *a, **k))
    use_adapter(transformer, CRITIC)
    n_switch = len(calls)
    assert n_switch > 0 and [p.requires_grad for p in params] == flags
    use_adapter(transformer, CRITIC)  # already active: nothing is touched
    assert len(calls) == n_switch and [p.requires_grad for p in params] == flags
    with torch.no_grad():
        assert torch.equal(models.base(x, s, labels), outputs[CRITIC])

    # a switch made behind use_adapter's back is seen: the state is read from the layers themselves
    transformer.set_adapter(STUDENT)
    assert active_adapter(transformer) == STUDENT
    use_adapter(transformer, CRITIC)
    with torch.no_grad():
        assert torch.equal(models.base(x, s, labels), outputs[CRITIC])
    use_adapter(transformer, None)
    with torch.no_grad():
        assert torch.equal(models.base(x, s, labels), outputs[None])
    with pytest.raises(ValueError, match="not found"):
        use_adapter(transformer, "nope")


def test_critic_samples_in_one_forward_equal_one_per_update(tiny_model_config):
    from swd.schedule import add_noise

    c = cfg("critic.updates=3")
    models = build_distill_models(tiny_teacher(tiny_model_config), c)
    nontrivial_adapters(models)
    ctx, noise = context(models, stage=2)
    batched = critic_samples(models.student, ctx, noise, 3)
    _, noise = context(models, stage=2)  # the same draws again
    inp = ctx.inputs
    with torch.no_grad():
        one_by_one = [models.student(add_noise(inp.previous, noise.randn(1, 24, 24), inp.sigma), inp.sigma, ctx.student_cond) for _ in range(3)]
    assert len(batched) == 3
    for a, b in zip(batched, one_by_one):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(batched[0], batched[1])  # fresh noise per update

    # the trainer runs the student once for all critic updates
    from accelerate import Accelerator

    from swd.distill.iteration import iteration

    calls = []
    models.student.register_forward_hook(lambda *_: calls.append(1))
    ctx, noise = context(models, stage=2)
    opts = tuple(torch.optim.SGD(v.trainable_parameters(), lr=0.0) for v in (models.student, models.critic))
    params = tuple(v.trainable_parameters() for v in (models.student, models.critic))
    iteration(Accelerator(cpu=True), models, Roles.of(models), opts, params, ctx, noise, c, 0)
    assert len(calls) == 2  # one for the 3 critic samples, one for the generator update


def test_full_student_critic_samples_repeat_raw_conditions(tiny_model_config):
    from swd.distill.objective import repeat_condition

    c = cfg("student=full", "critic.updates=2")
    models = build_distill_models(tiny_teacher(tiny_model_config), c)
    ctx, noise = context(models)
    assert isinstance(ctx.student_cond, torch.Tensor)  # raw labels: the copy encodes them itself
    assert torch.equal(repeat_condition(ctx.student_cond, 2), torch.cat([ctx.student_cond] * 2))
    assert repeat_condition(["a", "b"], 2) == ["a", "b", "a", "b"]
    both = repeat_condition(ctx.cond, 3)
    assert torch.equal(both.tokens, torch.cat([ctx.cond.tokens] * 3)) and torch.equal(both.pooled, torch.cat([ctx.cond.pooled] * 3))
    models.set_phase("critic")
    losses = one_critic_loss(models, ctx, noise, c)
    assert set(losses) == {"critic_regression", "critic_gan"}


@pytest.mark.parametrize("phase", ["generator", "critic"])
def test_early_exits_inside_per_block_checkpointing_give_the_same_gradients(tiny_model_config, phase):
    """The trainer checkpoints every block (swd.distill.grad_checkpointing); a forward that stops inside a
    checkpointed block must leave autograd clean and give the plain gradients."""
    from swd.distill.grad_checkpointing import enable_block_checkpointing

    grads = []
    for enabled in (False, True):
        c = cfg()
        models = build_distill_models(tiny_teacher(tiny_model_config), c)
        nontrivial_adapters(models)
        if enabled:
            enable_block_checkpointing(models.base.transformer)
        ctx, noise = context(models)
        models.set_phase(phase)
        if phase == "critic":
            loss = critic_total(one_critic_loss(models, ctx, noise, c), c.loss)
        else:
            loss = generator_total(generator_losses(models.student, models.teacher, models.critic, models.features, ctx, noise, c.loss), c.loss)
        assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None  # no checkpoint left half-open
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in models.base.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-6, msg=n)


def test_fsdp_roles_are_the_views_through_one_module(tiny_model_config):
    """distill.distributed=fsdp: every part is a role of ONE module (what FSDP shards, the base
    once); on one process nothing is sharded and each role gives exactly what its view gives."""
    from accelerate import Accelerator

    from swd.distill.fsdp import DistillModule, Role, is_sharded
    from swd.distill.trainer import prepare

    c = cfg("distributed=fsdp")
    models = build_distill_models(tiny_teacher(tiny_model_config), c)
    assert not models.student.fold and not models.critic.fold  # FSDP gathers weights per block: nothing to fold into
    roles, (opt_g, opt_c), (student_params, critic_params), ema = prepare(Accelerator(cpu=True), models, c)
    assert ema is None  # no average asked for (and none under FSDP)
    module = roles.student.module
    assert isinstance(module, DistillModule) and not is_sharded(models)
    assert all(isinstance(r, Role) and r.module is module for r in vars(roles).values())
    held = {id(p) for p in module.parameters()}
    assert {id(p) for p in models.base.parameters()} <= held and {id(p) for p in models.critic.head.parameters()} <= held
    assert {id(p) for g in opt_g.param_groups for p in g["params"]} == {id(p) for p in student_params}
    assert {id(p) for g in opt_c.param_groups for p in g["params"]} == {id(p) for p in critic_params}
    ctx, noise = context(models, stage=2)
    x, sigma, cond = ctx.inputs.x_t, ctx.inputs.sigma, ctx.cond
    with torch.no_grad():
        assert torch.equal(roles.student(x, sigma, cond), models.student(x, sigma, cond))
        assert torch.equal(roles.teacher(x, sigma, cond, ctx.null, 2.0), models.teacher(x, sigma, cond, ctx.null, 2.0))
        assert torch.equal(roles.features.features_only(x, sigma, cond), models.features.features_only(x, sigma, cond))
        assert torch.equal(roles.critic_frozen.logits_only(x, sigma, cond), models.critic.logits_only(x, sigma, cond))
        routed, direct = roles.critic(x, sigma, cond, real=ctx.inputs.target), models.critic(x, sigma, cond, real=ctx.inputs.target)
    assert all(torch.equal(a, b) for a, b in zip(routed, direct))
    with pytest.raises(ValueError, match="unknown view method 'parameters'"):
        module("student", "parameters")  # only the views' forwards run through the module


def test_ode_sigmas_run_from_the_stage_sigma_to_zero_on_the_grid():
    grid = loss_grid()
    assert ode_sigmas(1.0, 1, grid) == [1.0, 0.0]
    levels = ode_sigmas(0.6022, 4, grid)
    assert len(levels) == 5 and levels[0] == 0.6022 and levels[-1] == 0.0
    assert all(a > b for a, b in zip(levels, levels[1:]))  # strictly descending
    assert all(any(abs(s - float(g)) < 1e-7 for g in grid) for s in levels[1:-1])  # inner levels on the grid
    n_below = int((grid < 0.6022 - 1e-6).sum())
    assert len(ode_sigmas(0.6022, n_below + 1, grid)) == n_below + 2  # every grid level below: the most steps
    with pytest.raises(ValueError, match="teacher_regression_steps"):
        ode_sigmas(0.6022, n_below + 2, grid)


def test_euler_step_in_x0_form_is_the_velocity_step():
    torch.manual_seed(0)
    x, v = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    x0 = clean_from_velocity(x, v, 0.7)
    assert torch.allclose(euler_step_x0(x, x0, 0.7, 0.3), x + (0.3 - 0.7) * v, atol=1e-6)
    assert torch.allclose(euler_step_x0(x, x0, 0.7, 0.0), x0)


def test_teacher_regression_steps_solve_the_guided_teachers_ode(tiny_model_config):
    c = cfg("loss.teacher_regression_weight=1.0", "loss.dmd_weight=0", "loss.gan_weight=0", "loss.mmd_weight=0",
            "loss.dmd_guidance=3.0", "loss.teacher_regression_steps=4", "loss.teacher_regression_stages=[3]")
    models = build_distill_models(tiny_teacher(tiny_model_config), c)
    ctx, noise = context(models, stage=3)
    inp = ctx.inputs
    with torch.no_grad():
        solved = teacher_solution(models.teacher, inp.x_t, inp.sigma, ctx, 3.0, 4)
        one_step = teacher_solution(models.teacher, inp.x_t, inp.sigma, ctx, 3.0, 1)
        x0_hat = models.student(inp.x_t, inp.sigma, ctx.student_cond)
        fn = models.base.velocity_fn(ctx.cond, ctx.null, 3.0)  # the sampler's Euler on the guided velocity
        reference = sample_euler(fn, inp.x_t, torch.tensor(ode_sigmas(float(inp.sigma[0]), 4, ctx.levels.grid)))
    assert torch.allclose(solved, reference, atol=1e-5)
    assert torch.allclose(one_step, models.teacher(inp.x_t, inp.sigma, ctx.cond, ctx.null, 3.0))
    assert not torch.allclose(solved, one_step, atol=1e-3)
    losses = generator_losses(models.student, models.teacher, None, models.features, ctx, noise, c.loss)
    assert torch.allclose(losses["teacher_regression"], ((x0_hat - solved) ** 2).mean(), rtol=1e-5)
    ctx0, noise0 = context(models, stage=0)  # a stage outside teacher_regression_stages has no such term
    with pytest.raises(ValueError, match="no term at this stage"):
        generator_total(generator_losses(models.student, models.teacher, None, models.features, ctx0, noise0, c.loss), c.loss)


def test_teacher_regression_steps_and_stages_are_checked():
    with pytest.raises(ValueError, match="teacher_regression_steps must be >= 1"):
        build_distill_models(None, cfg("loss.teacher_regression_steps=0", "loss.teacher_regression_weight=1.0"))
    with pytest.raises(ValueError, match="teacher_regression_stages"):
        check_mmd_stages(cfg("loss.teacher_regression_stages=[7]").loss, 4)

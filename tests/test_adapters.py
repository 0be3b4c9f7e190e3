"""Adapter switching and folded-weight forwards for frozen adapters (swd.distill.adapters)."""

import pytest
import torch

from conftest import distill_config
from swd.distill.adapters import active_adapter, folded_weights, folding_pays_in_training, named_lora_layers, use_adapter
from swd.distill.grad_checkpointing import enable_block_checkpointing
from swd.distill.views import Roles, build_distill_models
from swd.student import CRITIC, STUDENT
from swd.models import build_denoiser


def models_for(tiny_model_config, *overrides: str):
    torch.manual_seed(0)
    models = build_distill_models(build_denoiser(tiny_model_config), distill_config("lora.rank=4", "batch_size=4", *overrides))
    with torch.no_grad():  # non-trivial adapters: lora_B starts at zero
        for n, p in models.base.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(n)))
    return models


def inputs(n=3, size=16):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 1, size, size, generator=g), torch.rand(n, generator=g), torch.arange(n) % 10


def live(view, x, s, labels, fold=False):
    """The view's output with folding switched off (peft's LoRA path)."""
    view.fold = fold
    try:
        return view(x, s, view.denoiser.condition(labels))
    finally:
        view.fold = True


def test_frozen_adapter_forward_runs_folded_and_equals_the_lora_path(tiny_model_config):
    models = models_for(tiny_model_config)
    x, s, labels = inputs()
    cond = models.base.condition(labels)
    models.set_phase("critic")  # the student is frozen: its samples may fold
    with torch.no_grad():
        folded = models.student(x, s, cond)
        assert active_adapter(models.base.transformer) is None  # ran with adapters off, on folded weights
        reference = live(models.student, x, s, labels)
        assert active_adapter(models.base.transformer) == STUDENT
        use_adapter(models.base.transformer, None)
        teacher = models.base.denoise(x, s, cond)
    torch.testing.assert_close(folded, reference, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(folded, teacher, atol=1e-3)  # the adapter did act


def test_folded_forward_passes_input_gradients_like_the_lora_path(tiny_model_config):
    """Generator phase: the critic is frozen, but the generator's loss flows through it to x0_hat."""
    models = models_for(tiny_model_config)
    models.set_phase("generator")
    x, s, labels = inputs()
    grads, features = [], []
    for fold in (True, False):
        xg = x.clone().requires_grad_()
        models.critic.fold = fold
        out = models.critic(xg, s, models.base.condition(labels))
        (out.x0.square().sum() + out.logits.sum()).backward()
        grads.append(xg.grad)
        features.append(models.critic.features_only(x, s, models.base.condition(labels)).detach())
    models.critic.fold = True
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(features[0], features[1], rtol=1e-5, atol=1e-5)
    assert all(p.grad is None for n, p in models.base.named_parameters() if f".{CRITIC}." in n)  # frozen: no gradient


@pytest.mark.parametrize("rank", [1, 4])
def test_training_folds_only_where_it_saves_products_with_the_same_gradients(tiny_model_config, rank):
    """Rank 1 on the tiny model: LoRA's extra products are cheaper than a weight gradient; rank 4: not."""
    models = models_for(tiny_model_config, f"lora.rank={rank}")
    layers = [(n, m) for n, m in named_lora_layers(models.base.transformer) if STUDENT in m.lora_A]
    assert folding_pays_in_training(layers, STUDENT) == (rank == 4)
    models.set_phase("generator")
    x, s, labels = inputs()
    grads = []
    for fold in (True, False):
        models.student.fold = fold
        models.student(x, s, models.base.condition(labels)).square().sum().backward()
        assert active_adapter(models.base.transformer) == (None if fold and rank == 4 else STUDENT)
        grads.append([p.grad.clone() for p in models.student.trainable_parameters()])
        models.base.zero_grad(set_to_none=True)
    assert any(g.abs().sum() > 0 for g in grads[0])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_folded_weights_follow_in_place_updates_and_leave_the_base_untouched(tiny_model_config):
    models = models_for(tiny_model_config)
    transformer = models.base.transformer
    base = {n: p.detach().clone() for n, p in transformer.named_parameters() if "lora_" not in n}
    x, s, labels = inputs()
    cond = models.base.condition(labels)
    models.set_phase("critic")
    with torch.no_grad():
        first = models.student(x, s, cond)
        assert folded_weights(transformer, STUDENT) is folded_weights(transformer, STUDENT)  # kept while unchanged
        for p in models.student.trainable_parameters():  # what an optimizer step does: in place
            p.mul_(1.5)
        second = models.student(x, s, cond)
        reference = live(models.student, x, s, labels)
    assert not torch.allclose(first, second, atol=1e-4)
    torch.testing.assert_close(second, reference, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(base[n], p) for n, p in transformer.named_parameters() if "lora_" not in n)


def test_no_folding_into_bf16_bases_or_under_block_checkpointing(tiny_model_config):
    models = models_for(tiny_model_config)
    transformer = models.base.transformer
    models.set_phase("generator")
    x, s, labels = inputs()
    enable_block_checkpointing(transformer)
    xg = x.clone().requires_grad_()
    models.critic(xg, s, models.base.condition(labels)).logits.sum().backward()
    assert active_adapter(transformer) == CRITIC  # a checkpointed block would recompute outside the folded call
    assert xg.grad is not None
    with torch.no_grad():
        models.critic(x, s, models.base.condition(labels))  # no graph, no recomputation: folds
    assert active_adapter(transformer) is None

    for n, p in transformer.named_parameters():
        if "lora_" not in n:
            p.data = p.data.to(torch.bfloat16)
    assert folded_weights(transformer, CRITIC) is None  # small updates would round away in bf16


def test_distillation_with_and_without_folding_matches(tiny_model_config):
    from accelerate import Accelerator

    from swd.distill.iteration import iteration
    from swd.distill.noise import BatchNoise, NoiseLevels, loss_grid
    from swd.distill.stage import LossContext, stage_inputs
    from swd.schedule import ScaleSchedule

    schedule = ScaleSchedule([16, 20, 24, 32], [1.0, 0.8959, 0.7371, 0.6022, 0.0])
    images = torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    labels = torch.arange(4)
    states = []
    for fold in (True, False):
        models = models_for(tiny_model_config, f"fold_adapters={str(fold).lower()}", "critic.updates=2")
        c = distill_config("lora.rank=4", "batch_size=4", "critic.updates=2", "optim.lr=1e-3", "optim.critic_lr=1e-3")
        params = tuple(v.trainable_parameters() for v in (models.student, models.critic))
        opts = tuple(torch.optim.AdamW(p, lr=1e-3) for p in params)
        for step in range(3):
            noise = BatchNoise(0, step, 4, 0, 1, torch.device("cpu"))
            stage = step % 4
            inp = stage_inputs(images, schedule, stage, noise.randn(1, *schedule.sizes[stage]))
            cond = models.base.condition(labels)
            levels = NoiseLevels(loss_grid(), {"dmd": (12, 27), "mmd": (18, 27), "critic": (0, 27)})
            ctx = LossContext(inp, cond, models.base.null_condition(4), cond, levels)
            iteration(Accelerator(cpu=True), models, Roles.of(models), opts, params, ctx, noise, c, step)
        states.append({n: p.detach().clone() for n, p in models.base.named_parameters() if "lora_" in n})
    assert states[0].keys() == states[1].keys()
    for n in states[0]:
        torch.testing.assert_close(states[0][n], states[1][n], rtol=1e-4, atol=1e-5, msg=n)


def test_use_adapter_rejects_unknown_adapters(tiny_model_config):
    models = models_for(tiny_model_config)
    with pytest.raises(ValueError, match="not found"):
        use_adapter(models.base.transformer, "nope")
    plain = build_denoiser(tiny_model_config)
    with pytest.raises(ValueError, match="no adapters"):
        use_adapter(plain.transformer, STUDENT)


def test_fold_auto_folds_narrow_high_rank_layers_only(tiny_model_config):
    """``fold_adapters: auto`` folds where LoRA's extra products are a sizeable share of the base's
    (the built-in models); a wide model at a low rank keeps one backbone (no folded copy)."""
    from dataclasses import replace

    from swd.distill.adapters import FOLD_AUTO_SHARE, _adapted, lora_product_share

    narrow = models_for(tiny_model_config, "lora.rank=8")
    share = lora_product_share(_adapted(narrow.base.transformer, STUDENT), STUDENT)
    assert share >= FOLD_AUTO_SHARE and narrow.student.fold and narrow.critic.fold
    wide_config = replace(tiny_model_config, attention_head_dim=128, num_attention_heads=4)  # 512 wide
    wide = build_distill_models(build_denoiser(wide_config), distill_config("lora.rank=4", "batch_size=4"))
    assert lora_product_share(_adapted(wide.base.transformer, CRITIC), CRITIC) < FOLD_AUTO_SHARE
    assert not wide.student.fold and not wide.critic.fold
    forced = build_distill_models(build_denoiser(wide_config), distill_config("lora.rank=4", "fold_adapters=true"))
    assert forced.student.fold and forced.critic.fold
    with pytest.raises(ValueError, match="fold_adapters='sometimes': use true, false or auto"):
        build_distill_models(build_denoiser(tiny_model_config), distill_config("fold_adapters=sometimes"))

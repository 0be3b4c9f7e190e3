"""The SD3.5 / FLUX presets and the memory estimate, checked without downloading anything.

The real transformers are built from their public configs on the meta device (no memory)."""

from pathlib import Path

import pytest
import torch
from torch import nn

from swd.config import load_config
from swd.memory import MODELS, block_count, build_transformer, estimate, estimate_preset, head_parameters, lora_parameters
from swd.models.pipeline_teachers import FluxDenoiser, SD3LatentDenoiser
from swd.schedule import ScaleSchedule, teacher_sigmas

ROOT = Path(__file__).resolve().parents[1]
# model -> (blocks, feature block, DMD guidance, global batch, make-data teacher steps, max text tokens); spec sections 3, 5, 7
SPEC = {
    "stabilityai/stable-diffusion-3.5-medium": (24, 11, 7.0, 64, 40, 256),
    "stabilityai/stable-diffusion-3.5-large": (38, 20, 4.5, 32, 28, 256),
    "black-forest-labs/FLUX.1-dev": (19 + 38, 15, 3.5, 32, 30, 512),
}
PRESETS = {
    "sd35_medium_swd4.yaml": ([64, 80, 96, 128], [1.0, 0.8959, 0.7371, 0.6022, 0.0]),
    "sd35_medium_swd6.yaml": ([32, 48, 64, 80, 96, 128], [1.0, 0.9454, 0.8959, 0.7904, 0.7371, 0.6022, 0.0]),
    "sd35_large_swd4.yaml": ([64, 80, 96, 128], [1.0, 0.8959, 0.7371, 0.6022, 0.0]),
    "flux_dev_swd4.yaml": ([64, 80, 96, 128], [1.0, 0.8956, 0.7363, 0.6007, 0.0]),
}


@pytest.fixture(scope="module")
def transformers():
    return {name: build_transformer(spec.family, spec.transformer) for name, spec in MODELS.items()}


def adapter(name, transformer):
    if MODELS[name].family == "flux":
        return FluxDenoiser(transformer, nn.Identity(), nn.Identity())
    return SD3LatentDenoiser(transformer, nn.Identity())


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_matches_the_paper_and_fits_its_model(preset, transformers):
    config = load_config(ROOT / "configs" / preset)
    name = config.model.pretrained
    blocks, feature_block, dmd_guidance, batch, teacher_steps, tokens = SPEC[name]
    sizes, sigmas = PRESETS[preset]
    schedule = ScaleSchedule(config.schedule.sizes, config.schedule.sigmas)
    assert [s[0] for s in schedule.sizes] == sizes and list(schedule.sigmas) == sigmas
    model = adapter(name, transformers[name])
    model.check_schedule(schedule)  # every size fits the patch size and the position table
    assert len(model.blocks) == block_count(model.transformer) == blocks
    d = config.distill
    assert d.critic.feature_block == feature_block and 0 <= d.critic.feature_block < blocks
    assert d.loss.dmd_guidance == dmd_guidance
    assert d.batch_size == batch and d.batch_size % 8 == 0  # 8 GPUs
    assert (d.lora.rank, d.optim.lr, d.optim.critic_lr, d.critic.updates) == (64, 5e-6, 5e-6, 5)
    assert (d.loss.mmd_weight, d.loss.dmd_weight, d.loss.gan_weight) == (1.0, 1.0, 0.005)
    assert 3000 <= d.steps <= 4000 and d.mode == "scalewise" and d.student == "lora"
    assert d.mixed_precision == "bf16" and d.gradient_checkpointing
    assert config.model.torch_dtype == "bfloat16" and config.model.max_text_length == tokens
    assert config.data.kind == "folder" and config.data.root and config.make_data.output_dir is None  # make-data writes data.root
    assert config.teacher.steps == teacher_steps
    if MODELS[name].family == "sd3":
        assert config.teacher.guidance == 4.5 and config.teacher.shift == 3.0


def test_sd3_sigmas_are_teacher_grid_points():
    grid = teacher_sigmas(28, 3.0)
    assert torch.allclose(grid[[0, 7, 14, 18, 28]], torch.tensor([1.0, 0.8959, 0.7371, 0.6022, 0.0]), atol=1e-4)


def test_lora_estimate_equals_a_built_models_adapter_count():
    from peft import LoraConfig

    from swd.distill.gan import GANHead

    tiny = {
        "sd3": dict(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=3, attention_head_dim=8, num_attention_heads=2,
                    joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=16, pos_embed_max_size=16,
                    dual_attention_layers=(0,), qk_norm="rms_norm"),
        "flux": dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=8, num_attention_heads=2,
                     joint_attention_dim=16, pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(2, 2, 4)),
    }
    for family, config in tiny.items():
        targets = FluxDenoiser.default_lora_targets if family == "flux" else SD3LatentDenoiser.default_lora_targets
        real = build_transformer(family, config, meta=False)
        base = sum(p.numel() for p in real.parameters())
        assert sum(p.numel() for p in build_transformer(family, config).parameters()) == base
        assert lora_parameters(build_transformer(family, config), 4, targets) == lora_parameters(real, 4, targets)
        real.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=targets if isinstance(targets, str) else list(targets)), "student")
        added = sum(p.numel() for p in real.parameters()) - base
        e = estimate("tiny", family, config, text_encoders=0, vae=0, lora_rank=4)
        assert e.transformer == base and e.lora == added > 0
        assert e.head == sum(p.numel() for p in GANHead(16, 4).parameters()) == head_parameters(16)
        buffers = sum(b.numel() for b in build_transformer(family, config, meta=False).buffers())
        assert e.buffers == buffers and e.total_bytes == 2 * (base + buffers) + 2 * added * 16 + e.head * 16


def test_preset_estimates_are_in_the_expected_range():
    gib = {p: estimate_preset(ROOT / "configs" / p).total_bytes / 2**30 for p in ("sd35_medium_swd4.yaml", "sd35_large_swd4.yaml", "flux_dev_swd4.yaml")}
    assert 10 < gib["sd35_medium_swd4.yaml"] < gib["sd35_large_swd4.yaml"] < gib["flux_dev_swd4.yaml"] < 80  # fits an 80 GB GPU before activations

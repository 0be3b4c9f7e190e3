"""SD3 and FLUX pipeline teachers: tiny components saved with save_pretrained, loaded by path."""

import csv
import json

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline
from PIL import Image
from safetensors.torch import load_file

from conftest import swd
from swd.registry import is_pipeline_reference, load_model, load_reference
from swd.config import ModelConfig, load_config
from swd.distill.trainer import distill
from swd.models.pipeline_teachers import FluxDenoiser, SD3LatentDenoiser, image_ids, pack, unpack
from swd.schedule import downsample
from swd.train.checkpoints import latest_checkpoint
from tiny_pipelines import tiny_flux_pipeline, tiny_sd3_pipeline

BUILDERS = {"sd3": tiny_sd3_pipeline, "flux": tiny_flux_pipeline}


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines")
    return {name: build(root / name) for name, build in BUILDERS.items()}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Six 32x32 RGB images with captions (pixels = 16 latents x VAE factor 2)."""
    root = tmp_path_factory.mktemp("data")
    (root / "images").mkdir()
    rows = []
    for i in range(6):
        array = (np.random.RandomState(i).rand(32, 32, 3) * 255).astype("uint8")
        Image.fromarray(array).save(root / "images" / f"{i}.png")
        rows.append([i, f"images/{i}.png", ["a red car", "a blue house", "a green tree"][i % 3]])
    with (root / "metainfo.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["index", "file_name", "caption"])
        writer.writerows(rows)
    return root


def load(pipelines, name, **cfg):
    model, model_cfg = load_reference(str(pipelines[name]), ModelConfig(max_text_length=16, **cfg))
    return model, model_cfg


def test_pipeline_directories_load_as_latent_teachers(pipelines):
    sd3, cfg = load(pipelines, "sd3")
    flux, _ = load(pipelines, "flux")
    assert isinstance(sd3, SD3LatentDenoiser) and isinstance(flux, FluxDenoiser)
    assert cfg.kind == "diffusers" and cfg.pretrained == str(pipelines["sd3"])
    assert is_pipeline_reference(str(pipelines["sd3"])) and not is_pipeline_reference("teacher")
    assert is_pipeline_reference("stabilityai/stable-diffusion-3.5-medium")  # a hub id
    assert sd3.codec.factor == 2 and flux.codec.factor == 2
    assert sd3.channels == 4 and flux.channels == 4 and flux.patch_size == 2
    assert (sd3.codec.scale, sd3.codec.shift) == (pytest.approx(1.5305), pytest.approx(0.0609))
    assert (flux.codec.scale, flux.codec.shift) == (pytest.approx(0.3611), pytest.approx(0.1159))


def test_flux_packing_and_position_ids_match_diffusers():
    x = torch.randn(2, 4, 6, 10)
    assert torch.equal(pack(x), FluxPipeline._pack_latents(x, 2, 4, 6, 10))
    assert torch.equal(unpack(pack(x), 6, 10), x)
    assert torch.equal(image_ids(6, 10, torch.device("cpu"), torch.float32), FluxPipeline._prepare_latent_image_ids(2, 3, 5, "cpu", torch.float32))


def test_flux_velocity_equals_the_transformer_called_like_the_stock_pipeline(pipelines):
    model, _ = load(pipelines, "flux")
    pipe = model.conditioner.pipeline
    x, sigma = torch.randn(2, 4, 8, 12), torch.tensor([0.7, 0.3])
    with torch.no_grad():
        cond = model.condition(["a red car", "a dog"])
        v = model(x, sigma, cond)
        tokens, pooled, text_ids = pipe.encode_prompt(["a red car", "a dog"], None, device="cpu", max_sequence_length=16)
        ref = pipe.transformer(hidden_states=FluxPipeline._pack_latents(x, 2, 4, 8, 12), timestep=sigma, guidance=torch.full([2], 3.5),
                               pooled_projections=pooled, encoder_hidden_states=tokens, txt_ids=text_ids,
                               img_ids=FluxPipeline._prepare_latent_image_ids(2, 4, 6, "cpu", torch.float32), return_dict=False)[0]
    assert v.shape == x.shape
    torch.testing.assert_close(pack(v), ref)
    with torch.no_grad():  # the embedded guidance is an input, not a second pass
        assert not torch.allclose(model.velocity_fn(cond, None, 5.0)(x, sigma), v)
    assert not model.needs_null_condition(5.0)


def test_sd3_velocity_takes_1000_sigma(pipelines):
    model, _ = load(pipelines, "sd3")
    x, sigma = torch.randn(2, 4, 8, 8), torch.tensor([0.7, 0.3])
    with torch.no_grad():
        cond = model.condition(["a red car", ""])
        ref = model.transformer(hidden_states=x, encoder_hidden_states=cond.tokens, pooled_projections=cond.pooled,
                                timestep=1000 * sigma, return_dict=False)[0]
        torch.testing.assert_close(model(x, sigma, cond), ref)
    assert model.needs_null_condition(4.5)


def test_latents_use_the_vae_factors_and_pixel_space_downscaling(pipelines):
    model, _ = load(pipelines, "sd3")
    vae = model.codec.vae
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        z = vae.encode(downsample(images, (16, 16))).latent_dist.mode()
        expected = (z - vae.config.shift_factor) * vae.config.scaling_factor
        latents = model.to_model_space(images, (8, 8))  # latent 8 = pixels 16
        torch.testing.assert_close(latents, expected)
        torch.testing.assert_close(model.decode(latents), vae.decode(z).sample)
    assert latents.shape == (2, 4, 8, 8)


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_block_features_are_image_tokens_of_every_block(pipelines, name):
    model, _ = load(pipelines, name)
    n_blocks = len(model.blocks)
    assert n_blocks == (2 if name == "sd3" else 3)  # FLUX: 1 double + 2 single blocks
    x = torch.randn(2, 4, 8, 12)
    with torch.no_grad(), model.block_features(list(range(n_blocks))) as captured:
        model(x, torch.tensor([0.5, 0.5]), ["a", "b"])
    tokens = (8 // 2) * (12 // 2)  # SD3: patch 2; FLUX: 2x2 packing
    assert all(f.shape[:2] == (2, tokens) for f in captured)


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_bf16_teacher_runs_in_its_dtype(pipelines, name):
    model, cfg = load(pipelines, name, torch_dtype="bfloat16")
    assert model.transformer.dtype == torch.bfloat16 and cfg.torch_dtype == "bfloat16"
    with torch.no_grad():
        v = model(torch.randn(1, 4, 8, 8), torch.tensor([0.5]), ["a red car"])
    assert v.dtype == torch.float32 and torch.isfinite(v).all()


def run_distill(teacher, data, out, steps, *extra):
    """In-process ``swd distill`` (the CLI path is exercised by tests/test_distill_cli.py)."""
    overrides = [f"model.pretrained={teacher}", "model.max_text_length=16", "data.kind=folder", f"data.root={data}",
                 "schedule.sizes=[8,12,16]", "schedule.sigmas=[1.0,0.8,0.6,0.0]", f"distill.steps={steps}", "distill.batch_size=2",
                 "distill.lora.rank=4", "distill.critic.updates=1", "distill.optim.lr=0.01", "distill.optim.critic_lr=0.01", "distill.sample_every=0",
                 "distill.checkpoint_every=1", f"output_dir={out}", "device=cpu", *extra]
    return distill(load_config(None, overrides))


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_distill_full_loss_resume_and_mmd_only(pipelines, data_dir, tmp_path, name):
    teacher = pipelines[name]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    lora = run_distill(teacher, data_dir, straight, 3)
    run_distill(teacher, data_dir, resumed, 2)
    run_distill(teacher, data_dir, resumed, 3)
    a = load_file(str(latest_checkpoint(straight) / "trainable.safetensors"))
    b = load_file(str(latest_checkpoint(resumed) / "trainable.safetensors"))
    assert a.keys() == b.keys() and any(k.startswith("critic.") for k in a)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)
    assert lora == straight / "student_lora" and not (straight / "student").exists()
    assert (lora / "pytorch_lora_weights.safetensors").is_file()
    # a FLUX student samples with the guidance embedding it was trained with; an SD3 one unguided
    assert json.loads((lora / "swd_lora.json").read_text())["guidance"] == (3.5 if name == "flux" else 1.0)
    # the exported LoRA reloads onto the pipeline teacher (through the CLI) and changes its output
    student = load_model(str(lora), load_config(None).model, torch.device("cpu"))
    base, _ = load(pipelines, name)
    x, sigma = torch.randn(1, 4, 8, 8), torch.tensor([0.6])
    with torch.no_grad():
        assert not torch.allclose(student(x, sigma, ["a red car"]), base(x, sigma, ["a red car"]))
    swd("sample", f"checkpoint={lora}", f"output_dir={tmp_path / 's'}", "sample.num_images=2", "sample.prompts=[a red car]", "device=cpu")
    assert Image.open(tmp_path / "s" / "samples.png").mode == "RGB"

    mmd = tmp_path / "mmd"
    run_distill(teacher, data_dir, mmd, 2, "distill.loss.dmd_weight=0", "distill.loss.gan_weight=0")
    state = load_file(str(latest_checkpoint(mmd) / "trainable.safetensors"))
    assert state and not any(k.startswith("critic.") for k in state)


def test_flux_lora_covers_single_blocks_but_not_the_final_projection(pipelines):
    from conftest import distill_config
    from swd.distill.views import build_distill_models

    model, _ = load(pipelines, "flux")
    build_distill_models(model, distill_config("lora.rank=2", "loss.dmd_weight=0", "loss.gan_weight=0"))
    names = [n for n, _ in model.transformer.named_modules() if n.endswith("lora_A")]
    assert any(n.startswith("single_transformer_blocks.0.proj_out") for n in names)
    assert any(n.startswith("single_transformer_blocks.1.proj_mlp") for n in names)
    assert any(n.startswith("transformer_blocks.0.attn.to_q") for n in names)
    assert not any(n.startswith("proj_out") for n in names)


def test_cached_encodings_train_like_fresh_ones(pipelines, data_dir, tmp_path):
    """data.cache_dir: latents and prompt embeddings computed once, then read back; same training."""
    cache = tmp_path / "cache"
    run_distill(pipelines["sd3"], data_dir, tmp_path / "fresh", 3)
    run_distill(pipelines["sd3"], data_dir, tmp_path / "cached", 3, f"data.cache_dir={cache}")
    files = sorted(cache.glob("*.safetensors"))
    assert files and len(files) <= 6 and not list(cache.glob("*.tmp"))
    item = load_file(str(files[0]))
    assert {"latent_8x8", "latent_12x12", "latent_16x16", "tokens", "pooled"} <= item.keys()
    assert item["latent_16x16"].shape == (4, 16, 16)
    a = load_file(str(latest_checkpoint(tmp_path / "fresh") / "trainable.safetensors"))
    b = load_file(str(latest_checkpoint(tmp_path / "cached") / "trainable.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-4, rtol=1e-3)
    # a cache made for another teacher is refused, naming what differs
    with pytest.raises(ValueError, match="teacher"):
        run_distill(pipelines["flux"], data_dir, tmp_path / "other", 1, f"data.cache_dir={cache}")


def test_bf16_teacher_trains_fp32_adapters_with_block_checkpointing(pipelines, data_dir, tmp_path):
    """A bf16 pipeline teacher: LoRA weights and AdamW states stay fp32; per-block checkpointing on."""
    run_distill(pipelines["sd3"], data_dir, tmp_path / "run", 2, "model.torch_dtype=bfloat16", "distill.gradient_checkpointing=true")
    state = load_file(str(latest_checkpoint(tmp_path / "run") / "trainable.safetensors"))
    assert state and all(v.dtype == torch.float32 for v in state.values())
    assert all(torch.isfinite(v).all() for v in state.values())


def test_bench_times_a_pipeline_teacher(pipelines, data_dir, tmp_path):
    """swd bench builds its training workloads with the trainer's stage builder, so a latent
    (pipeline) teacher works: text conditions, the VAE's latent space, the teacher's null prompt."""
    out = tmp_path / "bench"
    swd("bench", f"model.pretrained={pipelines['sd3']}", "model.max_text_length=16", "data.kind=folder", f"data.root={data_dir}",
        "schedule.sizes=[8,12,16]", "schedule.sigmas=[1.0,0.8,0.6,0.0]", "bench.batch_size=2", "bench.repeats=1",
        "bench.train_repeats=1", "bench.warmup=0", "teacher.steps=2", "distill.lora.rank=4", "distill.critic.updates=1",
        f"output_dir={out}", "device=cpu")
    r = json.loads((out / "bench.json").read_text())
    assert r["model"] == str(pipelines["sd3"])
    assert set(r["train_seconds_per_iteration"]) == {"scalewise-full", "scalewise-mmd", "fullres-full", "fullres-mmd"}
    assert all(t > 0 for t in r["train_seconds_per_iteration"].values())
    assert set(r["sample_seconds_per_image"]) == {"swd-3", "fullres-3", "fullres-2", "teacher-2"}
    assert r["ideal_token_ratio"] == pytest.approx((16 + 36 + 64) / (3 * 64))  # latent sizes 8/12/16, patch 2

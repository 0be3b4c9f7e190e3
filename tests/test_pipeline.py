"""ScaleWisePipeline: equals the stock pipelines at constant scale, grows the latent, loads LoRAs."""

import csv
import json

import numpy as np
import pytest
import torch
from diffusers import FlowMatchLCMScheduler, FluxPipeline, SD3Transformer2DModel, StableDiffusion3Pipeline
from PIL import Image
from safetensors.torch import save_file

from swd.models.pipeline_teachers import unpack
from swd.pipeline import ScaleWisePipeline, load_lora
from tiny_pipelines import tiny_flux_pipeline, tiny_sd3_pipeline

PROMPT = "a photo of a cat"
CONSTANT = dict(scales=[16, 16, 16], sigmas=[1.0, 0.75, 0.5, 0.0])  # 32x32 pixels, VAE factor 2
GROWING = dict(scales=[8, 12, 16], sigmas=[1.0, 0.75, 0.5, 0.0])
NON_SQUARE = dict(scales=[(8, 12), (12, 16), (16, 20)], sigmas=[1.0, 0.75, 0.5, 0.0])
KINDS = {"sd3": (tiny_sd3_pipeline, StableDiffusion3Pipeline), "flux": (tiny_flux_pipeline, FluxPipeline)}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines")
    return {name: build(root / name) for name, (build, _) in KINDS.items()}


@pytest.fixture(scope="module")
def stock(saved):
    """The stock pipelines with the scheduler that implements the same sampler (no shift)."""
    pipes = {}
    for name, (_, cls) in KINDS.items():
        pipe = cls.from_pretrained(saved[name])
        pipe.scheduler = FlowMatchLCMScheduler.from_config(pipe.scheduler.config, shift=1.0, use_dynamic_shifting=False)
        pipe.set_progress_bar_config(disable=True)
        pipes[name] = pipe
    return pipes


@pytest.fixture(scope="module")
def ours(stock):
    """Wrappers sharing the stock pipelines' components (no LoRA is ever loaded into these)."""
    pipes = {name: ScaleWisePipeline(pipe) for name, pipe in stock.items()}
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
    return pipes


def _latents(pipe, seed=0, **kwargs):
    kwargs = {**CONSTANT, **kwargs}
    return pipe(PROMPT, generator=torch.manual_seed(seed), output_type="latent", **kwargs).images


# --- equality with the stock pipelines --------------------------------------------------------
@pytest.mark.parametrize("name, guidance", [("sd3", 1.0), ("sd3", 2.0), ("flux", None), ("flux", 2.0)])
def test_constant_scales_equal_stock_pipeline(stock, ours, name, guidance):
    # the stock pipelines step the scheduler with the global RNG: seed it through the generator
    kwargs = {} if guidance is None else {"guidance_scale": guidance}
    ref = stock[name](PROMPT, height=32, width=32, sigmas=[1.0, 0.75, 0.5], num_inference_steps=3,
                      generator=torch.manual_seed(0), output_type="latent", **kwargs).images
    if name == "flux":
        ref = unpack(ref, 16, 16)  # (1, 64, 16) tokens -> (1, 4, 16, 16)
    out = _latents(ours[name], **kwargs)
    assert out.shape == (1, 4, 16, 16)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert not torch.allclose(out, _latents(ours[name], seed=1, **kwargs))


def test_default_guidance(stock, ours):
    """SD3 samples unguided by default (a student); FLUX uses its default guidance embedding 3.5."""
    assert ours["sd3"].default_guidance == 1.0
    torch.testing.assert_close(_latents(ours["sd3"]), _latents(ours["sd3"], guidance_scale=1.0), atol=0, rtol=0)
    assert ours["flux"].default_guidance == 3.5
    torch.testing.assert_close(_latents(ours["flux"]), _latents(ours["flux"], guidance_scale=3.5), atol=0, rtol=0)
    assert not torch.allclose(_latents(ours["flux"]), _latents(ours["flux"], guidance_scale=1.0))


def test_guidance_interval_on_sd3_and_refused_for_embedded_guidance(ours):
    """An interval around every sigma is full guidance, around none is unguided; FLUX.1-dev refuses one."""
    sd3 = ours["sd3"]
    guided = _latents(sd3, guidance_scale=2.0)
    torch.testing.assert_close(_latents(sd3, guidance_scale=2.0, guidance_interval=(0.4, 1.0)), guided, atol=0, rtol=0)
    torch.testing.assert_close(_latents(sd3, guidance_scale=2.0, guidance_interval=(0.0, 0.3)), _latents(sd3), atol=0, rtol=0)
    first = _latents(sd3, guidance_scale=2.0, guidance_interval=(0.9, 1.0))
    assert not torch.allclose(first, guided) and not torch.allclose(first, _latents(sd3))
    with pytest.raises(ValueError, match="embeds guidance"):
        _latents(ours["flux"], guidance_scale=2.0, guidance_interval=(0.9, 1.0))
    with pytest.raises(ValueError, match="lo <= hi"):
        _latents(sd3, guidance_scale=2.0, guidance_interval=(1.0, 0.9))


@pytest.mark.parametrize("name", list(KINDS))
def test_prompt_embeds_and_images_per_prompt(stock, ours, name):
    pipe = ours[name]
    prompts = [PROMPT, "a red car"]
    out = pipe(prompts, num_images_per_prompt=2, generator=torch.manual_seed(0), output_type="latent", **CONSTANT).images
    assert out.shape == (4, 4, 16, 16)
    if name == "flux":
        embeds, pooled, _ = stock[name].encode_prompt(prompts, None, max_sequence_length=512)
    else:
        embeds, _, pooled, _ = stock[name].encode_prompt(prompts, None, None, do_classifier_free_guidance=False)
    again = pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, num_images_per_prompt=2,
                 generator=torch.manual_seed(0), output_type="latent", **CONSTANT).images
    torch.testing.assert_close(again, out, atol=1e-6, rtol=0)


# --- growing and non-square schedules ---------------------------------------------------------
@pytest.mark.parametrize("schedule", [GROWING, NON_SQUARE], ids=["growing", "non-square"])
@pytest.mark.parametrize("name", list(KINDS))
def test_stage_shapes_and_flux_position_ids(stock, ours, name, schedule):
    sizes = [(s, s) if isinstance(s, int) else s for s in schedule["scales"]]
    inputs, calls = [], []
    hook = stock[name].transformer.register_forward_pre_hook(lambda m, args, kwargs: calls.append(kwargs), with_kwargs=True)
    try:
        images = ours[name](PROMPT, generator=torch.manual_seed(0), output_type="pt",
                            callback=lambda info: inputs.append(info), **schedule).images
    finally:
        hook.remove()
    assert [tuple(info["x"].shape) for info in inputs] == [(1, 4, h, w) for h, w in sizes]
    assert [info["sigma"] for info in inputs] == schedule["sigmas"][:-1]
    h, w = sizes[-1]
    assert images.shape == (1, 3, 2 * h, 2 * w)  # VAE factor 2
    assert torch.isfinite(images).all() and 0 <= images.min() and images.max() <= 1
    assert len(calls) == len(sizes)
    if name == "flux":
        for kwargs, (h, w) in zip(calls, sizes):
            expected = FluxPipeline._prepare_latent_image_ids(1, h // 2, w // 2, "cpu", torch.float32)
            torch.testing.assert_close(kwargs["img_ids"], expected, atol=0, rtol=0)
            assert kwargs["hidden_states"].shape == (1, (h // 2) * (w // 2), 16)
    else:
        assert [tuple(kwargs["hidden_states"].shape[-2:]) for kwargs in calls] == sizes


@pytest.mark.parametrize("name", list(KINDS))
def test_growing_stage_inputs_are_renoised_upsampled_predictions(ours, name):
    """Stage i+1 input = (1 - s) bicubic(x0_hat_i) + s eps, eps drawn next from the generator."""
    inputs = []
    ours[name](PROMPT, generator=torch.Generator().manual_seed(3), output_type="latent",
               callback=lambda info: inputs.append(info), **NON_SQUARE)
    generator = torch.Generator().manual_seed(3)
    torch.testing.assert_close(inputs[0]["x"], torch.randn(1, 4, 8, 12, generator=generator), atol=0, rtol=0)
    for prev, info in zip(inputs, inputs[1:]):
        _, c, h, w = info["x"].shape
        if name == "flux":  # the stock FLUX scheduler draws noise on packed tokens
            eps = unpack(torch.randn(1, (h // 2) * (w // 2), 4 * c, generator=generator), h, w)
        else:
            eps = torch.randn(1, c, h, w, generator=generator)
        up = torch.nn.functional.interpolate(prev["denoised"], size=(h, w), mode="bicubic", align_corners=False)
        sigma = info["sigma"]
        torch.testing.assert_close(info["x"], (1 - sigma) * up + sigma * eps, atol=1e-6, rtol=0)


@pytest.mark.parametrize("output_type, check", [
    ("pil", lambda images: [im.size for im in images] == [(32, 32)]),
    ("np", lambda images: images.shape == (1, 32, 32, 3)),
])
def test_output_types(ours, output_type, check):
    images = ours["sd3"](PROMPT, generator=torch.manual_seed(0), output_type=output_type, **GROWING).images
    assert check(images)


# --- bad input --------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    (dict(scales=[8, 12, 16], sigmas=[1.0, 0.5, 0.75, 0.0]), "strictly decrease"),
    (dict(scales=[8, 12, 16], sigmas=[1.0, 0.5, 0.0]), "needs n \\+ 1 sigmas"),
    (dict(scales=[8, 13, 16], sigmas=[1.0, 0.75, 0.5, 0.0]), "patch size"),
    (dict(scales=[8, (12, 15)], sigmas=[1.0, 0.5, 0.0]), "patch size"),
    (dict(scales=[16, 8], sigmas=[1.0, 0.5, 0.0]), "must not shrink"),
    (dict(upsample_mode="cubic", **GROWING), "upsample_mode"),
    (dict(output_type="jpg", **GROWING), "output_type"),
])
@pytest.mark.parametrize("name", list(KINDS))
def test_bad_input(ours, name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        ours[name](PROMPT, **kwargs)


def test_prompt_or_embeddings(ours):
    with pytest.raises(ValueError, match="either `prompt` or `prompt_embeds`"):
        ours["sd3"](**GROWING)
    with pytest.raises(ValueError, match="pooled_prompt_embeds"):
        ours["sd3"](prompt_embeds=torch.zeros(1, 4, 32), **GROWING)


# --- LoRA -------------------------------------------------------------------------------------
def _fresh(saved, name) -> ScaleWisePipeline:
    pipe = ScaleWisePipeline.from_pretrained(saved[name])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _without_adapters(pipe, **kwargs):
    pipe.transformer.disable_adapters()
    try:
        return _latents(pipe, **kwargs)
    finally:
        pipe.transformer.enable_adapters()


@pytest.fixture(scope="module")
def distilled(saved, tmp_path_factory):
    """A real one-step ``swd distill`` of the tiny SD3 pipeline (MMD only, large lr): its LoRA dir."""
    from swd.config import load_config
    from swd.distill.trainer import distill

    root = tmp_path_factory.mktemp("distill")
    (root / "data" / "images").mkdir(parents=True)
    with open(root / "data" / "metainfo.csv", "w", newline="") as f:
        rows = csv.writer(f)
        rows.writerow(["index", "file_name", "caption"])
        for i in range(4):
            pixels = (np.random.RandomState(i).rand(32, 32, 3) * 255).astype("uint8")
            Image.fromarray(pixels).save(root / "data" / "images" / f"{i}.png")
            rows.writerow([i, f"images/{i}.png", ["a red car", "a blue house"][i % 2]])
    config = load_config(None, [
        f"model.pretrained={saved['sd3']}", "model.max_text_length=16", "data.kind=folder", f"data.root={root / 'data'}",
        "schedule.sizes=[8,16]", "schedule.sigmas=[1.0,0.6,0.0]", "schedule.upsample_mode=nearest", "distill.steps=1", "distill.batch_size=2",
        "distill.lora.rank=4", "distill.optim.lr=0.01", "distill.loss.dmd_weight=0", "distill.loss.gan_weight=0",
        "distill.sample_every=0", "distill.checkpoint_every=100", f"output_dir={root / 'out'}", "device=cpu",
    ])
    distill(config)
    return root / "out" / "student_lora"


def test_lora_from_swd_distill(saved, distilled):
    assert (distilled / "pytorch_lora_weights.safetensors").is_file() and (distilled / "swd_lora.json").is_file()
    pipe = _fresh(saved, "sd3").load_lora(distilled)
    assert pipe.transformer.active_adapters() == ["student"]
    # the record sets the default schedule and the text length the student was distilled with
    assert pipe.schedule.sizes == ((8, 8), (16, 16)) and pipe.schedule.sigmas == (1.0, 0.6, 0.0)
    assert pipe.max_sequence_length == 16
    out = pipe(PROMPT, generator=torch.manual_seed(0), output_type="latent").images
    assert out.shape == (1, 4, 16, 16)
    schedule = dict(scales=[8, 16], sigmas=[1.0, 0.6, 0.0])
    assert not torch.allclose(_latents(pipe, **schedule), _without_adapters(pipe, **schedule), atol=1e-4)
    # from_pretrained(lora=...) gives the same student
    again = ScaleWisePipeline.from_pretrained(saved["sd3"], lora=distilled)
    again.set_progress_bar_config(disable=True)
    torch.testing.assert_close(_latents(again, **schedule), _latents(pipe, **schedule), atol=0, rtol=0)
    # it upsamples between stages as it was distilled (nearest here) unless told otherwise
    own = _latents(pipe, **schedule)
    torch.testing.assert_close(own, _latents(pipe, upsample_mode="nearest", **schedule), atol=0, rtol=0)
    assert not torch.allclose(own, _latents(pipe, upsample_mode="bicubic", **schedule), atol=1e-5)


@pytest.fixture(scope="module")
def peft_lora(saved, tmp_path_factory):
    """The authors' layout: ``PeftModel.save_pretrained`` over the transformer; also the PeftModel."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel.from_pretrained(saved["sd3"] / "transformer")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0", "ff.net.2"], init_lora_weights=False)
    model = get_peft_model(transformer, config)
    directory = tmp_path_factory.mktemp("peft") / "lora"
    model.save_pretrained(directory)
    return directory, model


def test_lora_in_peft_layout(saved, peft_lora):
    directory, peft_model = peft_lora
    assert (directory / "adapter_config.json").is_file() and (directory / "adapter_model.safetensors").is_file()
    pipe = _fresh(saved, "sd3").load_lora(directory)
    assert pipe.schedule is None and pipe.max_sequence_length == 256
    assert pipe.transformer.active_adapters() == ["student"]
    # loaded exactly, alpha included: the transformer now computes what the PeftModel computes
    torch.manual_seed(1)
    inputs = dict(hidden_states=torch.randn(1, 4, 16, 16), encoder_hidden_states=torch.randn(1, 7, 32),
                  pooled_projections=torch.randn(1, 64), timestep=torch.tensor([500.0]), return_dict=False)
    with torch.no_grad():
        torch.testing.assert_close(pipe.transformer(**inputs)[0], peft_model(**inputs)[0], atol=1e-5, rtol=0)
    assert not torch.allclose(_latents(pipe), _without_adapters(pipe), atol=1e-4)


@pytest.mark.parametrize("layout", ["swd", "peft"])
def test_lora_key_matching_no_module_raises(saved, tmp_path, layout):
    bad = "transformer_blocks.99.attn.to_q.lora_A.weight"
    state = {"transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 32),
             "transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(32, 4), bad: torch.zeros(4, 32)}
    if layout == "swd":
        save_file(state, str(tmp_path / "pytorch_lora_weights.safetensors"))
    else:
        save_file({f"base_model.model.{k}": v for k, v in state.items()}, str(tmp_path / "adapter_model.safetensors"))
        (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 4, "target_modules": ["to_q"]}))
    transformer = SD3Transformer2DModel.from_pretrained(saved["sd3"] / "transformer")
    with pytest.raises(ValueError, match=bad.replace(".", "\\.")):
        load_lora(transformer, tmp_path)
    assert not getattr(transformer, "peft_config", None)  # nothing was loaded half-way


def test_lora_directory_without_either_layout(saved, tmp_path):
    transformer = SD3Transformer2DModel.from_pretrained(saved["sd3"] / "transformer")
    with pytest.raises(FileNotFoundError, match="pytorch_lora_weights.safetensors.*adapter_config.json"):
        load_lora(transformer, tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_lora(transformer, tmp_path / "missing")

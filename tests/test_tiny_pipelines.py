"""The tiny offline SD3 / FLUX pipelines load by path and sample deterministically."""

import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline
from transformers import AutoTokenizer

from tiny_pipelines import tiny_flux_pipeline, tiny_sd3_pipeline

PROMPT = "a photo of a cat"
OTHER = "a red car in the city at night"

# name -> (builder, pipeline class, packed/unpacked latent shape at 32x32)
KINDS = {
    "sd3": (tiny_sd3_pipeline, StableDiffusion3Pipeline, (1, 4, 16, 16)),
    # FLUX latents come back packed: (B, (H/2/2)*(W/2/2), 4*C) with vae factor 2.
    "flux": (tiny_flux_pipeline, FluxPipeline, (1, 64, 16)),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each tiny pipeline built once and saved to its own directory."""
    root = tmp_path_factory.mktemp("tiny_pipelines")
    return {name: build(root / name) for name, (build, _, _) in KINDS.items()}


@pytest.fixture(scope="module")
def loaded(saved):
    pipes = {}
    for name, (_, cls, _) in KINDS.items():
        pipe = cls.from_pretrained(saved[name])
        pipe.set_progress_bar_config(disable=True)
        pipes[name] = pipe
    return pipes


def _run(pipe, prompt, seed=0, output_type="latent"):
    return pipe(
        prompt,
        height=32,
        width=32,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(seed),
        output_type=output_type,
    ).images


@pytest.mark.parametrize("name", list(KINDS))
def test_saved_layout(saved, name):
    path = saved[name]
    assert (path / "model_index.json").is_file()
    for sub in ("transformer", "vae", "scheduler", "text_encoder", "tokenizer", "tokenizer_2"):
        assert (path / sub).is_dir(), sub


@pytest.mark.parametrize("name", list(KINDS))
def test_images_shape_and_range(loaded, name):
    images = _run(loaded[name], PROMPT, output_type="pt")
    assert images.shape == (1, 3, 32, 32)
    assert torch.isfinite(images).all()
    assert 0.0 <= images.min() and images.max() <= 1.0


@pytest.mark.parametrize("name", list(KINDS))
def test_same_seed_same_output_other_prompt_differs(loaded, name):
    pipe = loaded[name]
    first = _run(pipe, PROMPT)
    assert first.shape == KINDS[name][2]
    assert torch.equal(first, _run(pipe, PROMPT))
    assert not torch.allclose(first, _run(pipe, OTHER))
    assert not torch.allclose(first, _run(pipe, PROMPT, seed=1))


@pytest.mark.parametrize("name", list(KINDS))
def test_empty_prompt(loaded, name):
    latents = _run(loaded[name], "")
    assert latents.shape == KINDS[name][2]
    assert torch.isfinite(latents).all()


def test_encode_prompt_shapes(loaded):
    sd3 = loaded["sd3"]
    embeds, neg, pooled, neg_pooled = sd3.encode_prompt(PROMPT, None, None, do_classifier_free_guidance=True)
    # 77 CLIP tokens (CLIP-L ++ CLIP-G hidden states, padded/cut to T5 width) then 256 T5 tokens.
    assert embeds.shape == neg.shape == (1, 77 + 256, 32)
    assert pooled.shape == neg_pooled.shape == (1, 64)

    flux = loaded["flux"]
    embeds, pooled, text_ids = flux.encode_prompt(PROMPT, None)
    assert embeds.shape == (1, 512, 32)
    assert pooled.shape == (1, 32)
    assert text_ids.shape == (512, 3) and not text_ids.any()


@pytest.mark.parametrize("name", list(KINDS))
def test_tokenizers_load_by_path(saved, name):
    path = saved[name]
    t5_slot = "tokenizer_3" if name == "sd3" else "tokenizer_2"
    clip = AutoTokenizer.from_pretrained(path / "tokenizer")
    t5 = AutoTokenizer.from_pretrained(path / t5_slot)
    assert clip.model_max_length == 77
    def ids(tokenizer, prompt, max_length, **kw):  # as the pipelines' encode_prompt calls them
        return tokenizer([prompt], padding="max_length", max_length=max_length, truncation=True, return_length=False,
                         return_overflowing_tokens=False, return_tensors="pt", **kw).input_ids

    for prompt in ("", "An Ünïcode prompt, with punctuation!  and   spaces ☃"):
        clip_ids = ids(clip, prompt, 77)
        assert clip_ids.shape == (1, 77)
        assert clip_ids[0, 0] == clip.bos_token_id and clip.eos_token_id in clip_ids[0]
        assert ids(t5, prompt, 16, add_special_tokens=True).shape == (1, 16)
    long = " ".join(["word"] * 200)
    assert clip([long], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids.shape == (1, 77)


@pytest.mark.parametrize("name", list(KINDS))
def test_build_is_deterministic(saved, tmp_path, name):
    from safetensors.torch import load_file

    again = KINDS[name][0](tmp_path / name)
    for sub in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        (file,) = sorted((saved[name] / sub).glob("*.safetensors"))
        a, b = load_file(file), load_file(again / sub / file.name)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), sub

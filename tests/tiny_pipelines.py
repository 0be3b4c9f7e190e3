"""Tiny, offline SD3 and FLUX diffusers pipelines for tests.

Everything here is built from config dicts with no network access: the tokenizers are generated
locally, the models are randomly initialised under fixed seeds, and the result is written with
``save_pretrained`` so that tests load it back exactly as they would a hub id::

    path = tiny_sd3_pipeline(tmp_path / "sd3")
    pipe = StableDiffusion3Pipeline.from_pretrained(path)

Tokenizer classes (transformers 5, both backed by the ``tokenizers`` library):

* CLIP: ``transformers.CLIPTokenizer`` (byte-level BPE, ``</w>`` end-of-word suffix) built from a
  generated vocab (the 256 byte-level symbols, each also with ``</w>``, a few merged words, then
  ``<|startoftext|>`` and ``<|endoftext|>`` as the last two ids, like real CLIP) and merges.
  ``model_max_length`` is 77, which the pipelines read as ``tokenizer_max_length``.
* T5: ``transformers.T5Tokenizer`` (Unigram + Metaspace, ``</s>`` appended) built from a
  generated ``[(piece, score)]`` list: ``<pad>``=0, ``</s>``=1, ``<unk>``=2, ``▁``, printable
  ASCII, ``▁``-prefixed characters and a few whole words. No sentinel ``<extra_id_*>`` tokens.
  ``model_max_length`` is 512.

Both handle arbitrary English prompts and the empty prompt (CLIP gives ``[bos, eos, pad...]``,
T5 gives ``[</s>, <pad>...]``); characters outside the vocab map to the unknown token.
"""

from __future__ import annotations

import contextlib
import string
from pathlib import Path

import torch

CLIP_MAX_LENGTH = 77
T5_MAX_LENGTH = 512

# A few whole words so that tokenization is not purely per character.
_WORDS = (
    "a", "an", "the", "of", "in", "on", "and", "with", "photo", "picture", "painting", "cat", "dog",
    "red", "blue", "green", "house", "tree", "car", "man", "woman", "sky", "city", "portrait",
)


@contextlib.contextmanager
def _seeded(seed: int):
    """Seed torch's CPU RNG for the block without disturbing the caller's global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte -> printable unicode symbol table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    symbols = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for s in symbols:
        vocab[s] = len(vocab)
    for s in symbols:
        vocab[s + "</w>"] = len(vocab)
    merges: list[str] = []
    for word in _WORDS:
        # Merge left to right: "c a" -> "ca", "ca t</w>" -> "cat</w>".
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            a, b = pieces[0], pieces[1]
            merge = f"{a} {b}"
            if merge not in merges:
                merges.append(merge)
            if a + b not in vocab:
                vocab[a + b] = len(vocab)
            pieces = [a + b] + pieces[2:]
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab, merges


def make_clip_tokenizer(directory) -> Path:
    """Write a tiny CLIP tokenizer (``transformers.CLIPTokenizer``) to ``directory``; return it."""
    import json

    from transformers import CLIPTokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab, merges = _clip_vocab_and_merges()
    # The classic slow-tokenizer files too, so the directory also reads as a "real" CLIP tokenizer.
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer(
        vocab=vocab, merges=[tuple(m.split(" ")) for m in merges], model_max_length=CLIP_MAX_LENGTH
    )
    tok.save_pretrained(directory)
    return directory


def clip_vocab_size() -> int:
    return len(_clip_vocab_and_merges()[0])


def _t5_vocab() -> list[tuple[str, float]]:
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    seen = {p for p, _ in pieces}

    def add(piece: str, score: float) -> None:
        if piece not in seen:
            seen.add(piece)
            pieces.append((piece, score))

    for word in _WORDS:
        add("▁" + word, -1.0)
    for ch in string.ascii_letters + string.digits:
        add("▁" + ch, -3.0)
    for ch in string.printable.strip():
        add(ch, -4.0)
    return pieces


def t5_vocab_size() -> int:
    return len(_t5_vocab())


def make_t5_tokenizer(directory) -> Path:
    """Write a tiny T5 tokenizer (``transformers.T5Tokenizer``, Unigram) to ``directory``; return it."""
    from transformers import T5Tokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok = T5Tokenizer(vocab=_t5_vocab(), extra_ids=0, model_max_length=T5_MAX_LENGTH)
    tok.save_pretrained(directory)
    return directory


def _tokenizers(tmp: Path):
    from transformers import CLIPTokenizer, T5Tokenizer

    clip = CLIPTokenizer.from_pretrained(make_clip_tokenizer(tmp / "clip"))
    t5 = T5Tokenizer.from_pretrained(make_t5_tokenizer(tmp / "t5"))
    return clip, t5


def _clip_config():
    from transformers import CLIPTextConfig

    vocab, _ = _clip_vocab_and_merges()
    eos = vocab["<|endoftext|>"]
    return CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,  # SD3 reads hidden_states[-2]
        num_attention_heads=4,
        max_position_embeddings=CLIP_MAX_LENGTH,
        projection_dim=32,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=eos,  # != 2, so the pooled output is taken at the first eos token
        pad_token_id=eos,
    )


def _t5_encoder():
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=t5_vocab_size(),
        d_model=32,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        dropout_rate=0.0,
        feed_forward_proj="relu",
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        is_encoder_decoder=False,
        use_cache=False,
    )
    return T5EncoderModel(config)


def _tiny_vae(scaling_factor: float, shift_factor: float):
    from diffusers import AutoencoderKL

    # Two blocks -> vae_scale_factor 2; no quant convs, like the SD3 / FLUX VAEs.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 8),
        layers_per_block=1,
        act_fn="silu",
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def tiny_sd3_pipeline(directory, seed: int = 0) -> Path:
    """Build a tiny StableDiffusion3Pipeline, save it to ``directory`` and return the path."""
    import tempfile

    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection

    directory = Path(directory)
    with tempfile.TemporaryDirectory() as tmp, _seeded(seed):
        clip_tok, t5_tok = _tokenizers(Path(tmp))
        transformer = SD3Transformer2DModel(
            sample_size=32,
            patch_size=2,
            in_channels=4,
            out_channels=4,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=4,
            joint_attention_dim=32,  # = T5 d_model (CLIP 32+32 is cut to 32 by the pipeline's pad)
            caption_projection_dim=32,
            pooled_projection_dim=64,  # two CLIP projections of 32
            pos_embed_max_size=32,
        )
        text_encoder, text_encoder_2, text_encoder_3, vae = _built(
            seed,
            lambda: CLIPTextModelWithProjection(_clip_config()),
            lambda: CLIPTextModelWithProjection(_clip_config()),
            _t5_encoder,
            lambda: _tiny_vae(scaling_factor=1.5305, shift_factor=0.0609),
        )
        components = dict(text_encoder=text_encoder, tokenizer=clip_tok, text_encoder_2=text_encoder_2, tokenizer_2=clip_tok,
                          text_encoder_3=text_encoder_3, tokenizer_3=t5_tok)
        StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae, **components).save_pretrained(directory)
    return directory


def _built(seed: int, *builders) -> list:
    """``builders[i]()`` after ``torch.manual_seed(seed + 1 + i)``: each component reproducible on its own."""
    built = []
    for i, build in enumerate(builders):
        torch.manual_seed(seed + 1 + i)
        built.append(build())
    return built


def tiny_flux_pipeline(directory, seed: int = 0) -> Path:
    """Build a tiny FluxPipeline, save it to ``directory`` and return the path."""
    import tempfile

    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    directory = Path(directory)
    with tempfile.TemporaryDirectory() as tmp, _seeded(seed):
        clip_tok, t5_tok = _tokenizers(Path(tmp))
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=16,  # 4 latent channels packed 2x2
            out_channels=None,
            num_layers=1,
            num_single_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,  # = T5 d_model
            pooled_projection_dim=32,  # = CLIP hidden size (pooler_output)
            guidance_embeds=True,
            axes_dims_rope=(4, 4, 8),  # sums to attention_head_dim
        )
        text_encoder, text_encoder_2, vae = _built(
            seed, lambda: CLIPTextModel(_clip_config()), _t5_encoder, lambda: _tiny_vae(scaling_factor=0.3611, shift_factor=0.1159)
        )
        # As in black-forest-labs/FLUX.1-dev's scheduler_config.json.
        scheduler = FlowMatchEulerDiscreteScheduler(
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        )
        components = dict(text_encoder=text_encoder, tokenizer=clip_tok, text_encoder_2=text_encoder_2, tokenizer_2=t5_tok)
        FluxPipeline(transformer=transformer, scheduler=scheduler, vae=vae, **components).save_pretrained(directory)
    return directory

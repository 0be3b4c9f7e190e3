"""Real teachers from diffusers pipelines: SD3 / SD3.5 and FLUX, loaded with ``from_pretrained``.

A pipeline teacher is a :class:`Denoiser` in the VAE's latent space. Every model difference
lives in its adapter, so the distiller, the losses and the samplers never look at the model:

- SD3 / SD3.5 (``SD3Transformer2DModel``): ``timestep = 1000 sigma``; features from the joint
  blocks; classifier-free guidance with the empty prompt.
- FLUX (``FluxTransformer2DModel``): latents packed into 2x2 tokens, image position ids recomputed
  for every size, ``timestep = sigma``; a guidance-distilled model (FLUX.1-dev) takes its guidance
  as an embedding instead of a second, unconditional pass; features from the double then the
  single blocks.
- Both: the VAE's scaling and shift factors (:class:`LatentCodec`); prompts through the pipeline's
  own ``encode_prompt`` (:class:`PromptConditioner`).

``model.pretrained`` may be a hub id (users with internet) or a local pipeline directory; tests
build tiny pipelines, ``save_pretrained`` them and load them back by path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, DiffusionPipeline, FluxTransformer2DModel, SD3Transformer2DModel
from torch import nn

from ..config import ModelConfig
from .backbone import Denoiser, parameter_dtype
from .conditioning import Condition

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    if name not in DTYPES:
        raise ValueError(f"unknown model.torch_dtype {name!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


class LatentCodec(nn.Module):
    """Pixels in [-1, 1] <-> the VAE's normalised latents ``(z - shift) * scale``.

    Encoding takes the posterior mean (deterministic targets, so cached latents stay valid).
    """

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae
        self.factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.scale = float(vae.config.scaling_factor)
        self.shift = float(getattr(vae.config, "shift_factor", None) or 0.0)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        z = self.vae.encode(pixels.to(parameter_dtype(self.vae))).latent_dist.mode()  # (B, c, H/f, W/f)
        return ((z - self.shift) * self.scale).to(pixels.dtype)

    @torch.no_grad()
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        z = x.to(parameter_dtype(self.vae)) / self.scale + self.shift
        return self.vae.decode(z, return_dict=False)[0].to(x.dtype)


class PromptConditioner(nn.Module):
    """Prompts -> ``Condition`` through the pipeline's own ``encode_prompt`` (frozen encoders).

    SD3: tokens = CLIP-L + CLIP-G (padded) and T5 tokens, pooled = both CLIP projections.
    FLUX: tokens = T5, pooled = CLIP. Nothing here trains; the empty prompt is the null condition.
    """

    ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")

    def __init__(self, pipeline, family: str, max_length: int):
        super().__init__()
        self.encoders = nn.ModuleList([getattr(pipeline, n) for n in self.ENCODERS if getattr(pipeline, n, None) is not None])
        self.encoders.requires_grad_(False).eval()
        self.pipeline = pipeline  # not a Module: holds the tokenizers and ``encode_prompt``
        self.family = family
        self.max_length = max_length

    def train(self, mode: bool = True) -> "PromptConditioner":
        super().train(mode)
        self.encoders.eval()  # frozen encoders: dropout off
        return self

    @property
    def device(self) -> torch.device:
        return next(self.encoders.parameters()).device

    @torch.no_grad()
    def forward(self, prompts: Sequence[str]) -> Condition:
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings, not one string")
        prompts = list(prompts)
        if self.family == "flux":
            tokens, pooled, _ = self.pipeline.encode_prompt(prompts, None, device=self.device, max_sequence_length=self.max_length)
        else:
            tokens, _, pooled, _ = self.pipeline.encode_prompt(
                prompts, None, None, device=self.device, do_classifier_free_guidance=False, max_sequence_length=self.max_length
            )
        return Condition(tokens, pooled)

    def null_values(self, n: int) -> list[str]:
        return [""] * n

    def drop(self, values: Sequence[str], mask: torch.Tensor) -> list[str]:
        return ["" if m else v for v, m in zip(values, mask.tolist())]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {}


class SD3LatentDenoiser(Denoiser):
    """SD3 / SD3.5 in latent space: the built-in adapter plus the VAE and the pipeline's prompts."""

    family = "sd3"


def pack(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) latents -> (B, H/2 * W/2, 4C) FLUX tokens (2x2 patches, channels fastest)."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)  # (B, H/2, W/2, C, 2, 2)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`pack`: (B, H/2 * W/2, 4C) -> (B, C, H, W)."""
    b, _, d = tokens.shape
    c = d // 4
    x = tokens.view(b, height // 2, width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)  # (B, C, H/2, 2, W/2, 2)
    return x.reshape(b, c, height, width)


def image_ids(height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """FLUX position ids (H/2 * W/2, 3) for a latent of ``height`` x ``width``: (0, row, column)."""
    rows = torch.arange(height // 2, device=device, dtype=dtype)
    cols = torch.arange(width // 2, device=device, dtype=dtype)
    ids = torch.zeros(height // 2, width // 2, 3, device=device, dtype=dtype)
    ids[..., 1] = rows[:, None]
    ids[..., 2] = cols[None, :]
    return ids.reshape(-1, 3)


class FluxDenoiser(Denoiser):
    """FLUX in latent space. Position ids are rebuilt from each input's size, so any scale works."""

    family = "flux"
    timestep_scale = 1.0  # diffusers' FLUX transformer takes sigma (it multiplies by 1000 inside)
    # double blocks as SD3; single blocks' q/k/v and MLP projections. A regex (peft full-matches a
    # string), because the suffix "proj_out" alone would also hit the model's final projection.
    default_lora_targets = (
        r".*(transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
        r"|ff\.net\.0\.proj|ff\.net\.2|ff_context\.net\.0\.proj|ff_context\.net\.2|proj_mlp|proj_out))"
    )

    def __init__(self, transformer: nn.Module, conditioner: nn.Module, codec: nn.Module, guidance: float = 3.5):
        super().__init__(transformer, conditioner, codec)
        self.guidance = guidance  # embedded guidance of a guidance-distilled model (FLUX.1-dev)

    @property
    def patch_size(self) -> int:
        return 2 * int(self.transformer.config.patch_size)  # 2x2 latent packing

    @property
    def channels(self) -> int:
        return int(self.transformer.config.in_channels) // 4

    @property
    def max_side(self) -> int:
        return 2**16  # rotary position embeddings: no table to outgrow

    @property
    def embeds_guidance(self) -> bool:
        return bool(self.transformer.config.guidance_embeds)

    @property
    def blocks(self) -> list[nn.Module]:
        return list(self.transformer.transformer_blocks) + list(self.transformer.single_transformer_blocks)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond, guidance: float | None = None) -> torch.Tensor:
        """Velocity (B, C, H, W); ``guidance`` is the embedded guidance (default ``self.guidance``)."""
        if not isinstance(cond, Condition):
            cond = self.conditioner(cond)
        b, _, h, w = x.shape
        dtype = parameter_dtype(self.transformer)
        sigma = torch.as_tensor(sigma, device=x.device, dtype=x.dtype).expand(b)
        g = None
        if self.embeds_guidance:
            g = torch.full((b,), self.guidance if guidance is None else guidance, device=x.device, dtype=dtype)
        out = self.transformer(
            hidden_states=pack(x).to(dtype),  # (B, L, 4C)
            encoder_hidden_states=cond.tokens.to(dtype),
            pooled_projections=cond.pooled.to(dtype),
            timestep=(sigma * self.timestep_scale).to(dtype),
            img_ids=image_ids(h, w, x.device, dtype),
            txt_ids=torch.zeros(cond.tokens.shape[1], 3, device=x.device, dtype=dtype),
            guidance=g,
            return_dict=False,
        )[0]
        return unpack(out, h, w).to(x.dtype)

    def velocity_fn(self, cond: Condition, null: Condition | None, guidance: float):
        """A guidance-distilled FLUX takes ``guidance`` as an embedding in one forward."""
        if self.embeds_guidance:
            return lambda x, sigma: self(x, sigma, cond, guidance=guidance)
        return super().velocity_fn(cond, null, guidance)

    def needs_null_condition(self, guidance: float) -> bool:
        return not self.embeds_guidance and guidance != 1.0


FAMILIES = {"StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux"}


def pipeline_family(pipeline) -> str:
    return family_of(type(pipeline).__name__)


def family_of(name: str) -> str:
    """The family ("sd3" or "flux") of a pipeline class name: ``StableDiffusion3Pipeline``, ``FluxPipeline``, ..."""
    for prefix, family in FAMILIES.items():
        if name.startswith(prefix):
            return family
    raise ValueError(f"{name} is not supported as a teacher; supported pipelines: {', '.join(FAMILIES)}")


def load_pipeline(reference: str, cfg: ModelConfig):
    """``DiffusionPipeline.from_pretrained`` with the config's dtype, variant and revision."""
    path = Path(reference)
    if path.exists() and not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"{reference} is not a diffusers pipeline directory (no model_index.json)")
    return DiffusionPipeline.from_pretrained(reference, dtype=parse_dtype(cfg.torch_dtype), variant=cfg.variant, revision=cfg.revision)


def denoiser_from_pipeline(pipeline, cfg: ModelConfig) -> Denoiser:
    """Wrap a loaded SD3 / FLUX pipeline's components (shared, not copied) as a latent-space Denoiser."""
    family = pipeline_family(pipeline)
    codec = LatentCodec(pipeline.vae)
    max_length = cfg.max_text_length
    conditioner = PromptConditioner(pipeline, family, max_length)
    if family == "flux":
        return FluxDenoiser(pipeline.transformer, conditioner, codec, cfg.embedded_guidance)
    return SD3LatentDenoiser(pipeline.transformer, conditioner, codec)


def load_pipeline_denoiser(reference: str, cfg: ModelConfig | None = None) -> tuple[Denoiser, ModelConfig]:
    """A pipeline teacher and the ModelConfig that reloads it (``kind: diffusers``).

    In that config ``in_channels`` is the PIXEL data's channel count (3) and ``sample_size`` the
    pixel side the data is read at (set by the trainer from the schedule).
    """
    cfg = cfg or ModelConfig()
    pipeline = load_pipeline(reference, cfg)
    model = denoiser_from_pipeline(pipeline, cfg)
    model.requires_grad_(False).eval()
    out = ModelConfig(**{**vars(cfg), "kind": "diffusers", "pretrained": str(reference), "conditioning": "text", "in_channels": 3})
    return model, out


def load_pipeline_codec(reference: str, cfg: ModelConfig | None = None) -> Denoiser:
    """A pipeline's latent space without its heavy parts: the real VAE (``cfg``'s dtype, variant and
    revision) and the transformer built from its config on the meta device, with no weights and no
    text encoders. Enough for the geometry (patch size, position limit) and
    :meth:`Denoiser.to_model_space`, e.g. to measure the latents of a data set (``swd schedule``)."""
    cfg = cfg or ModelConfig()
    path = Path(reference)
    if path.exists() and not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"{reference} is not a diffusers pipeline directory (no model_index.json)")
    family = family_of(DiffusionPipeline.load_config(reference, revision=cfg.revision)["_class_name"])
    transformer_cls, denoiser_cls = {"sd3": (SD3Transformer2DModel, SD3LatentDenoiser), "flux": (FluxTransformer2DModel, FluxDenoiser)}[family]
    config = transformer_cls.load_config(reference, subfolder="transformer", revision=cfg.revision)
    with init_empty_weights(), torch.device("meta"):  # no weights: only the config is read
        transformer = transformer_cls.from_config(config)
    vae = AutoencoderKL.from_pretrained(reference, subfolder="vae", dtype=parse_dtype(cfg.torch_dtype), variant=cfg.variant, revision=cfg.revision)
    return denoiser_cls(transformer, nn.Identity(), LatentCodec(vae.requires_grad_(False).eval()))

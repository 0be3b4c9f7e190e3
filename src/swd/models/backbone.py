"""Backbone adapters: one sigma convention in, velocity out.

``Denoiser`` wraps a diffusers transformer and a conditioner. It owns everything model-specific
(the timestep scale, which blocks give features, the largest size the position embedding
supports), so samplers, trainers and losses stay model-agnostic.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import torch
import yaml
from diffusers import SD3Transformer2DModel
from safetensors.torch import load_file, save_file
from torch import nn

from ..config import ModelConfig, from_dict, read_yaml
from ..sampling import guided_velocity
from ..schedule import ScaleSchedule, SizeLike, as_size, clean_from_velocity, downsample
from .conditioning import ClassConditioner, Condition, ConditionValues, TextConditioner
from .hooks import capture_outputs


def parameter_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of the module's first floating-point parameter: what diffusers' ``ModelMixin.dtype``
    returns, without its walk over every module (hundreds per forward on a LoRA'd transformer)."""
    return next(p.dtype for p in module.parameters() if p.is_floating_point())


class IdentityCodec(nn.Module):
    """The built-in models work in pixel space: images are the model's inputs."""

    factor = 1  # pixels per model-space position

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return x


class Denoiser(nn.Module):
    """SD3-family adapter: ``velocity(x, sigma, cond)`` with sigma in [0, 1].

    diffusers' SD3 transformer takes ``timestep = 1000 * sigma``; that conversion lives here and
    nowhere else. ``codec`` maps pixels to the model's space and back (identity for the built-in
    pixel-space models, a VAE for pipeline teachers, see :mod:`swd.models.pipelines`).
    """

    timestep_scale = 1000.0
    default_lora_targets = (
        "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
        "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
    )  # attention q/k/v/out and MLP projections of every joint block (spec section 7)

    def __init__(self, transformer: SD3Transformer2DModel, conditioner: nn.Module, codec: nn.Module | None = None):
        super().__init__()
        self.transformer = transformer
        self.conditioner = conditioner
        self.codec = codec if codec is not None else IdentityCodec()

    # --- geometry -------------------------------------------------------------------------
    @property
    def patch_size(self) -> int:
        return int(self.transformer.config.patch_size)

    @property
    def channels(self) -> int:
        return int(self.transformer.config.in_channels)

    @property
    def max_side(self) -> int:
        """Largest height/width the position embedding covers."""
        return int(self.transformer.config.pos_embed_max_size) * self.patch_size

    def check_size(self, size: SizeLike) -> None:
        h, w = as_size(size)
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"size {(h, w)} is not divisible by the patch size {p}; use multiples of {p}")
        if h > self.max_side or w > self.max_side:
            raise ValueError(
                f"size {(h, w)} exceeds what the position embedding supports ({self.max_side} = "
                f"pos_embed_max_size {self.transformer.config.pos_embed_max_size} x patch {p})"
            )

    def pixel_size(self, size: SizeLike) -> tuple[int, int]:
        """Image size in pixels for a model-space size."""
        h, w = as_size(size)
        return h * self.codec.factor, w * self.codec.factor

    def to_model_space(self, images: torch.Tensor, size: SizeLike) -> torch.Tensor:
        """Images (B, C, H, W) in [-1, 1] at model-space ``size``: area-downscaled in PIXEL space,
        then encoded (spec section 5: pixel downscaling before the VAE beats latent downscaling)."""
        return self.codec.encode(downsample(images, self.pixel_size(size)))

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Model-space samples -> images in [-1, 1]."""
        return self.codec.decode(x)

    def check_schedule(self, schedule: ScaleSchedule) -> None:
        for i, size in enumerate(schedule.sizes):
            try:
                self.check_size(size)
            except ValueError as err:
                raise ValueError(f"schedule stage {i}: {err}") from None

    # --- conditioning ---------------------------------------------------------------------
    @property
    def num_classes(self) -> int | None:
        """Classes of a class-conditional model; None for a text-conditioned one."""
        return getattr(self.conditioner, "num_classes", None)

    def condition(self, values: ConditionValues) -> Condition:
        return self.conditioner(values)

    def null_condition(self, n: int) -> Condition:
        return self.conditioner(self.conditioner.null_values(n))

    # --- forward --------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: Condition | ConditionValues) -> torch.Tensor:
        """Velocity ``eps - x0`` for noisy ``x`` (B, C, H, W) at noise level ``sigma`` (B,).

        ``cond`` is a :class:`Condition` or raw labels / captions (encoded inside this forward, so
        that a DDP-wrapped model sees the conditioner's parameters used).
        """
        if not isinstance(cond, Condition):
            cond = self.conditioner(cond)
        sigma = torch.as_tensor(sigma, device=x.device, dtype=x.dtype).expand(x.shape[0])
        dtype = parameter_dtype(self.transformer)  # a bf16 / fp16 teacher takes inputs in its own dtype
        return self.transformer(
            hidden_states=x.to(dtype),
            encoder_hidden_states=cond.tokens.to(dtype),
            pooled_projections=cond.pooled.to(dtype),
            timestep=(sigma * self.timestep_scale).to(dtype),
            return_dict=False,
        )[0].to(x.dtype)

    def velocity_fn(self, cond: Condition, null: Condition | None, guidance: float):
        """``(x, sigma) -> v`` with classifier-free guidance ``guidance`` (one batched forward)."""
        return guided_velocity(self, cond, null, guidance)

    def needs_null_condition(self, guidance: float) -> bool:
        """Whether sampling with ``guidance`` runs an unconditional pass (classifier-free guidance)."""
        return guidance != 1.0

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, cond: Condition | ConditionValues) -> torch.Tensor:
        """Clean-sample prediction ``x0 = x - sigma v``."""
        return clean_from_velocity(x, self(x, sigma, cond), sigma)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.transformer.transformer_blocks

    @contextmanager
    def block_features(self, indices: Sequence[int]) -> Iterator[list[torch.Tensor | None]]:
        """Image-token features (B, L, C) of the given blocks for forwards inside the block."""
        n = len(self.blocks)
        bad = [i for i in indices if not -n <= i < n]
        if bad:
            raise ValueError(f"block indices {bad} out of range for a model with {n} blocks")
        with capture_outputs([self.blocks[i] for i in indices]) as captured:
            yield captured

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"transformer.{k}": v for k, v in self.transformer.state_dict().items()}
        state.update({f"conditioner.{k}": v for k, v in self.conditioner.trainable_state_dict().items()})
        return state


def build_conditioner(cfg: ModelConfig) -> nn.Module:
    if cfg.conditioning == "class":
        return ClassConditioner(cfg.num_classes, cfg.num_condition_tokens, cfg.joint_attention_dim, cfg.pooled_projection_dim)
    if cfg.conditioning == "text":
        if not cfg.text_encoder:
            raise ValueError("model.conditioning=text needs model.text_encoder (a local directory, a hub id, or 'minilm')")
        return TextConditioner(cfg.text_encoder, cfg.joint_attention_dim, cfg.pooled_projection_dim, cfg.max_text_length)
    raise ValueError(f"unknown model.conditioning {cfg.conditioning!r}; use 'class' or 'text'")


def build_denoiser(cfg: ModelConfig) -> Denoiser:
    """A freshly initialised built-in backbone from its config."""
    if cfg.kind != "sd3":
        raise ValueError(f"unknown model.kind {cfg.kind!r}; the built-in backbone is 'sd3'")
    transformer = SD3Transformer2DModel(
        sample_size=cfg.sample_size,
        patch_size=cfg.patch_size,
        in_channels=cfg.in_channels,
        out_channels=cfg.in_channels,
        num_layers=cfg.num_layers,
        attention_head_dim=cfg.attention_head_dim,
        num_attention_heads=cfg.num_attention_heads,
        joint_attention_dim=cfg.joint_attention_dim,
        caption_projection_dim=cfg.caption_projection_dim,
        pooled_projection_dim=cfg.pooled_projection_dim,
        pos_embed_max_size=cfg.pos_embed_max_size,
    )
    return Denoiser(transformer, build_conditioner(cfg))


MODEL_CONFIG_FILE = "model.yaml"
CONDITIONER_FILE = "conditioner.safetensors"


def save_denoiser(model: Denoiser, directory: str | Path, cfg: ModelConfig) -> Path:
    """``directory/transformer`` (diffusers layout), ``conditioner.safetensors``, ``model.yaml``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.transformer.save_pretrained(directory / "transformer", safe_serialization=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.conditioner.trainable_state_dict().items()}
    save_file(state, str(directory / CONDITIONER_FILE))
    (directory / MODEL_CONFIG_FILE).write_text(yaml.safe_dump(vars(cfg), sort_keys=False))
    return directory


def load_model_config(directory: str | Path) -> ModelConfig:
    path = Path(directory) / MODEL_CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {directory} is not a model directory written by swd (expected {MODEL_CONFIG_FILE}, transformer/, {CONDITIONER_FILE})")
    return from_dict(ModelConfig, read_yaml(path.read_text()) or {})


def load_denoiser(directory: str | Path) -> tuple[Denoiser, ModelConfig]:
    """Load a model directory written by :func:`save_denoiser` (eval mode, on CPU)."""
    directory = Path(directory)
    cfg = load_model_config(directory)
    if not (directory / "transformer").is_dir():
        raise FileNotFoundError(f"{directory / 'transformer'} is missing: the model directory is incomplete")
    transformer = SD3Transformer2DModel.from_pretrained(directory / "transformer")
    conditioner = build_conditioner(cfg)
    cond_path = directory / CONDITIONER_FILE
    if not cond_path.is_file():
        raise FileNotFoundError(f"{cond_path} is missing: the model directory is incomplete")
    missing, unexpected = conditioner.load_state_dict(load_file(str(cond_path)), strict=False)
    missing = [k for k in missing if not k.startswith("encoder.")]
    if missing or unexpected:
        raise ValueError(f"{cond_path} does not match model.yaml: missing {missing}, unexpected {unexpected}")
    model = Denoiser(transformer, conditioner).eval()
    return model, cfg

"""Training memory of SwD on SD3.5 / FLUX, estimated from parameter counts (no weights needed).

What one process holds (spec section 7: one frozen base, the student and the critic as two LoRA
adapters on it, the GAN head on the critic)::

    bytes = (P_transformer + P_text_encoders + P_vae) * bytes_per_weight   # frozen, 2 for bf16
          + B_transformer * bytes_per_weight                                 # buffers: SD3's position table
          + 2 * P_lora * (4 weight + 4 grad + 8 AdamW m, v)                 # student + critic adapters, fp32
          + P_head * 16                                                      # GAN head, fp32, AdamW
          + activations                                                      # not estimated

``P_transformer`` and ``P_lora`` are exact: the transformer is built from its public config on the
meta device (no memory, no download) and ``P_lora = sum over targeted Linear layers of
rank * (in + out)`` with the backbone adapter's default targets (peft's own matching). Activations
depend on batch, resolution and stage and are not estimated; :func:`measure` measures them
(random weights, a GPU): one SD3.5-M student forward + backward at latent 128, batch 8, holds 86 GiB,
8 GiB with diffusers' per-block gradient checkpointing (``distill.gradient_checkpointing``
checkpoints whole forwards, which does not shrink that). Not counted either: DDP's gradient
buckets (another 4 bytes per trainable parameter), the CUDA context and allocator slack.

    python -m swd.memory                       # the presets in configs/, as a Markdown table
    python -m swd.memory --json results/memory.json configs/sd35_large_swd4.yaml
    python -m swd.memory --measure cuda --json results/memory.json    # also measured, on a GPU
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
from accelerate import init_empty_weights
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
from peft import LoraConfig
from peft.tuners.tuners_utils import check_target_module_exists
from torch import nn

from .config import load_config
from .distill.gan import GANHead
from .distill.views import build_distill_models
from .models.backbone import Denoiser
from .models.conditioning import Condition
from .models.pipeline_teachers import FluxDenoiser, SD3LatentDenoiser

GIB = 2**30

# Public transformer configs (the hub's transformer/config.json, the keys that change the parameter count).
SD35_MEDIUM = dict(
    sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
    joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
    pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
)
SD35_LARGE = dict(
    sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64, num_attention_heads=38,
    joint_attention_dim=4096, caption_projection_dim=2432, pooled_projection_dim=2048, out_channels=16,
    pos_embed_max_size=192, qk_norm="rms_norm",
)
FLUX_DEV = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56),
)
# Text encoders and VAE, counted from their public configs (T5: the encoder with one shared embedding).
CLIP_L = 123_650_304  # CLIPTextModelWithProjection, ViT-L/14 text tower (FLUX's CLIPTextModel: 123_060_480)
CLIP_G = 694_659_840  # OpenCLIP bigG text tower with projection
T5_XXL = 4_762_310_656  # T5 v1.1 XXL encoder
VAE = 83_819_683  # the 16-channel AutoencoderKL of SD3 / FLUX


@dataclass(frozen=True)
class ModelSpec:
    family: str  # "sd3" or "flux": picks the transformer class and the default LoRA targets
    transformer: dict
    text_encoders: int
    vae: int


MODELS = {
    "stabilityai/stable-diffusion-3.5-medium": ModelSpec("sd3", SD35_MEDIUM, CLIP_L + CLIP_G + T5_XXL, VAE),
    "stabilityai/stable-diffusion-3.5-large": ModelSpec("sd3", SD35_LARGE, CLIP_L + CLIP_G + T5_XXL, VAE),
    "black-forest-labs/FLUX.1-dev": ModelSpec("flux", FLUX_DEV, 123_060_480 + T5_XXL, VAE),
}


def build_transformer(family: str, config: dict, meta: bool = True) -> nn.Module:
    """The diffusers transformer of ``family`` from a config dict; on the meta device unless ``meta=False``."""
    classes = {"sd3": SD3Transformer2DModel, "flux": FluxTransformer2DModel}
    if family not in classes:
        raise ValueError(f"unknown model family {family!r}; use one of {', '.join(classes)}")
    if not meta:
        return classes[family].from_config(dict(config))
    with init_empty_weights(), torch.device("meta"):  # buffers (SD3's position table) on meta too
        return classes[family].from_config(dict(config))


def block_count(transformer: nn.Module) -> int:
    """Blocks ``distill.critic.feature_block`` indexes: joint blocks (SD3), then single blocks (FLUX)."""
    return len(transformer.transformer_blocks) + len(getattr(transformer, "single_transformer_blocks", []))


def default_lora_targets(family: str):
    return FluxDenoiser.default_lora_targets if family == "flux" else Denoiser.default_lora_targets


def lora_parameters(model: nn.Module, rank: int, targets) -> int:
    """Parameters of one LoRA adapter: ``rank * (in + out)`` per Linear layer peft would target."""
    targets = targets if isinstance(targets, str) else list(targets)  # a string is a regex (full match)
    config = LoraConfig(r=rank, target_modules=targets)
    return sum(rank * (m.in_features + m.out_features) for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and check_target_module_exists(config, name))


def head_parameters(width: int, layers: int = 4) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in GANHead(width, layers).parameters())


@dataclass(frozen=True)
class MemoryEstimate:
    name: str
    transformer: int  # parameters of the frozen transformer
    buffers: int  # elements of its buffers (SD3.5-M's 384 x 384 position table: 0.23B)
    text_encoders: int
    vae: int
    lora: int  # parameters of ONE adapter (the student's; the critic's is the same size)
    head: int  # GAN head parameters
    bytes_per_weight: int  # of the frozen parts

    @property
    def frozen_bytes(self) -> int:
        return (self.transformer + self.buffers + self.text_encoders + self.vae) * self.bytes_per_weight

    @property
    def trainable_bytes(self) -> int:
        return 2 * self.lora * (4 + 4 + 8) + self.head * 16

    @property
    def total_bytes(self) -> int:
        return self.frozen_bytes + self.trainable_bytes

    def record(self) -> dict:
        return {**asdict(self), "frozen_gib": round(self.frozen_bytes / GIB, 2), "trainable_gib": round(self.trainable_bytes / GIB, 2),
                "total_gib_without_activations": round(self.total_bytes / GIB, 2)}


def estimate(name: str, family: str, transformer_config: dict, text_encoders: int, vae: int, lora_rank: int = 64,
             lora_targets=None, head_layers: int = 4, with_head: bool = True, bytes_per_weight: int = 2) -> MemoryEstimate:
    """Memory of one frozen base + student and critic adapters + GAN head + AdamW (module docstring)."""
    model = build_transformer(family, transformer_config)
    cfg = model.config
    width = cfg.num_attention_heads * cfg.attention_head_dim
    return MemoryEstimate(
        name=name,
        transformer=sum(p.numel() for p in model.parameters()),
        buffers=sum(b.numel() for b in model.buffers()),
        text_encoders=text_encoders,
        vae=vae,
        lora=lora_parameters(model, lora_rank, lora_targets or default_lora_targets(family)),
        head=head_parameters(width, head_layers) if with_head else 0,
        bytes_per_weight=bytes_per_weight,
    )


def measure(preset: str | Path, device: str = "cuda", batch: int | None = None, gpus: int = 8) -> dict:
    """Measure on ``device`` what the estimate leaves out, with RANDOM weights at the real sizes.

    Builds the preset's transformer (bf16), the student and critic adapters and the GAN head with
    :func:`swd.distill.views.build_distill_models`, casts the trainable parameters to fp32, takes
    one AdamW step on zero gradients (so the states exist), then runs one student forward and
    backward (bf16 autocast) at the schedule's final size on ``batch`` images (default: the
    preset's per-GPU batch, ``distill.batch_size // gpus``) with random text tokens, with diffusers'
    per-block gradient checkpointing and without it. Text encoders and VAE are not loaded.
    CUDA only (it reads ``torch.cuda.max_memory_allocated``).
    """

    config = load_config(preset)
    spec = MODELS[config.model.pretrained]
    batch = batch or config.distill.batch_size // gpus
    torch.cuda.empty_cache()
    start = torch.cuda.memory_allocated(device)
    with torch.device(device):
        transformer = build_transformer(spec.family, spec.transformer, meta=False).to(torch.bfloat16)
    torch.cuda.empty_cache()
    if spec.family == "flux":
        model = FluxDenoiser(transformer, nn.Identity(), None, config.model.embedded_guidance)
        text_tokens = config.model.max_text_length
    else:
        model = SD3LatentDenoiser(transformer, nn.Identity())
        text_tokens = 77 + config.model.max_text_length  # CLIP tokens + T5 tokens
    models = build_distill_models(model, config.distill)
    trainable = models.student.trainable_parameters() + models.critic.trainable_parameters()
    record = {"preset": Path(preset).stem, "device": torch.cuda.get_device_name(device), "torch": torch.__version__,
              "adapter_dtype_as_built": str(trainable[0].dtype)}
    for p in trainable:
        p.data = p.data.float()
        p.grad = torch.zeros_like(p)
    optimizers = [torch.optim.AdamW(params, lr=config.distill.optim.lr) for params in (models.student.trainable_parameters(), models.critic.trainable_parameters())]
    for optimizer in optimizers:
        optimizer.step()  # allocates m and v
    for p in trainable:
        p.grad = None
    e = estimate_preset(preset)
    record["static_measured_gib"] = round((torch.cuda.memory_allocated(device) - start) / GIB, 2)  # base + adapters + AdamW, grads freed
    record["static_estimate_gib"] = round(((e.transformer + e.buffers) * e.bytes_per_weight + e.trainable_bytes - 2 * e.lora * 4 - e.head * 4) / GIB, 2)
    side = config.schedule.sizes[-1]
    cfg = transformer.config
    x = torch.randn(batch, model.channels, side, side, device=device)
    cond = Condition(torch.randn(batch, text_tokens, cfg.joint_attention_dim, device=device), torch.randn(batch, cfg.pooled_projection_dim, device=device))
    sigma = torch.full((batch,), float(config.schedule.sigmas[-2]), device=device)
    models.set_phase("generator")
    record["batch"], record["latent_side"], record["text_tokens"] = batch, side, text_tokens
    for mode in ("per_block", "none"):
        if mode == "per_block":
            transformer.enable_gradient_checkpointing()
        else:
            transformer.disable_gradient_checkpointing()
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        try:
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
                out = models.student(x, sigma, cond)
            out.float().square().mean().backward()
            torch.cuda.synchronize(device)
            record[f"student_step_activations_gib_checkpointing_{mode}"] = round((torch.cuda.max_memory_allocated(device) - before) / GIB, 2)
        except torch.OutOfMemoryError:
            record[f"student_step_activations_gib_checkpointing_{mode}"] = f"out of memory ({torch.cuda.get_device_properties(device).total_memory / GIB:.0f} GiB)"
        except Exception as err:  # keep what was measured so far
            record[f"student_step_activations_gib_checkpointing_{mode}"] = f"{type(err).__name__}: {str(err)[:120]}"
            break
        out = None
        for p in trainable:
            p.grad = None
    return record


BYTES = {None: 4, "float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}


def estimate_preset(path: str | Path) -> MemoryEstimate:
    """The estimate for a preset config whose ``model.pretrained`` is one of :data:`MODELS`."""

    config = load_config(path)
    spec = MODELS.get(config.model.pretrained)
    if spec is None:
        raise ValueError(f"{path}: model.pretrained {config.model.pretrained!r} has no known config; known: {', '.join(MODELS)}")
    d = config.distill
    return estimate(Path(path).stem, spec.family, spec.transformer, spec.text_encoders, spec.vae, d.lora.rank, d.lora.targets,
                    d.critic.head_layers, d.loss.gan_weight > 0, BYTES[config.model.torch_dtype])


def markdown(estimates: Sequence[MemoryEstimate]) -> str:
    lines = ["| preset | transformer | text encoders | VAE | LoRA (each of 2) | GAN head | frozen GiB | trainable GiB | total GiB (no activations) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for e in estimates:
        r = e.record()
        lines.append(f"| {e.name} | {e.transformer / 1e9:.2f}B | {e.text_encoders / 1e9:.2f}B | {e.vae / 1e6:.1f}M | {e.lora / 1e6:.1f}M | "
                     f"{e.head / 1e6:.1f}M | {r['frozen_gib']:.1f} | {r['trainable_gib']:.1f} | {r['total_gib_without_activations']:.1f} |")
    return "\n".join(lines)


PRESETS = ("configs/sd35_medium_swd4.yaml", "configs/sd35_medium_swd6.yaml", "configs/sd35_large_swd4.yaml", "configs/flux_dev_swd4.yaml")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m swd.memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("configs", nargs="*", default=list(PRESETS), help="preset YAML files (default: the SD3.5 / FLUX presets)")
    parser.add_argument("--json", help="also write the numbers and the command to this file")
    parser.add_argument("--measure", metavar="DEVICE", help="also measure each preset on this CUDA device (random weights, see measure())")
    args = parser.parse_args(argv)
    estimates = [estimate_preset(p) for p in args.configs]
    print(markdown(estimates))
    measured = []
    for path in args.configs if args.measure else []:
        try:
            measured.append(measure(path, args.measure))
        except Exception as err:  # one model's failure (e.g. a CUDA error) must not hide the others' numbers
            measured.append({"preset": Path(path).stem, "error": f"{type(err).__name__}: {str(err)[:300]}"})
        print(json.dumps(measured[-1]))
    if args.json:
        record = {"command": "python -m swd.memory " + " ".join(sys.argv[1:] if argv is None else argv),
                  "formula": "(P_transformer + B_transformer + P_text_encoders + P_vae) * bytes_per_weight + 2 * P_lora * (4 + 4 + 8) + P_head * 16 + activations (not estimated)",
                  "unit": "GiB = 2**30 bytes", "presets": [e.record() for e in estimates]}
        if measured:
            record["measured"] = measured
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Scale-wise sampling with diffusers SD3 / SD3.5 and FLUX pipelines (spec section 4).

:class:`ScaleWisePipeline` wraps a loaded ``StableDiffusion3Pipeline`` or ``FluxPipeline`` (its
components are shared, not copied) and samples the way a SwD student was distilled: start from
noise at a low latent size, predict the clean latent, upsample that prediction (bicubic; never the
noisy latent) to the next size, re-noise it with fresh noise, repeat::

    pipe = ScaleWisePipeline.from_pretrained("stabilityai/stable-diffusion-3.5-medium",
                                             lora="out/student_lora", torch_dtype=torch.float16).to("cuda")
    image = pipe("a cat", scales=[64, 80, 96, 128], sigmas=[1.0, 0.8959, 0.7371, 0.6022, 0.0]).images[0]

Scales are LATENT sizes (an int for square, or a (height, width) pair); the image is the VAE
factor times larger. Every random number comes from diffusers' ``randn_tensor`` with the given
``generator``, in the order of the stock pipeline with ``FlowMatchLCMScheduler``: the initial
latents at ``scales[0]``, then one fresh noise tensor per later stage (FLUX: drawn in the packed
token layout the stock scheduler sees). With constant scales the result equals the stock pipeline's.

LoRA (:func:`swd.student.load_lora`): a directory written by ``swd distill``
(``pytorch_lora_weights.safetensors`` + ``swd_lora.json``) or peft's ``PeftModel.save_pretrained``
layout over the transformer (``adapter_config.json`` + ``adapter_model.safetensors``, the authors'
published format).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from diffusers import DiffusionPipeline
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from .config import FLUX_SWD4_SIGMAS, SWD4_SIGMAS, ModelConfig
from .generate import limited_guidance_velocity
from .models.conditioning import Condition
from .models.pipeline_teachers import denoiser_from_pipeline, parse_dtype, pipeline_family, unpack
from .sampling import Callback, NoiseFn, check_guidance_interval, sample_scalewise
from .schedule import UPSAMPLE_MODES, ScaleSchedule, SizeLike
from .student import STUDENT, load_lora, schedule_of, upsample_mode_of

Generator = Union[torch.Generator, list[torch.Generator], None]

# The authors' 4-step schedules (spec section 3), latent sizes for a VAE factor of 8.
DEFAULT_SCHEDULES = {
    "sd3": ((64, 80, 96, 128), SWD4_SIGMAS),
    "flux": ((64, 80, 96, 128), FLUX_SWD4_SIGMAS),
}
TEXT_LENGTHS = {"sd3": 256, "flux": 512}  # the stock pipelines' default max_sequence_length
OUTPUT_TYPES = ("pil", "np", "pt", "latent")


# --- sampling ---------------------------------------------------------------------------------
def step_noise_fn(family: str, generator: Generator, device: torch.device) -> NoiseFn:
    """Fresh float32 noise of shape (B, C, H, W), drawn in the layout the stock scheduler sees.

    The stock FLUX pipeline steps its scheduler on packed (B, H/2 * W/2, 4C) tokens, so the noise is
    drawn in that shape and unpacked; SD3 steps on (B, C, H, W) latents.
    """

    def draw(shape: tuple[int, ...]) -> torch.Tensor:
        if family != "flux":
            return randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        b, c, h, w = shape
        tokens = randn_tensor((b, (h // 2) * (w // 2), 4 * c), generator=generator, device=device, dtype=torch.float32)
        return unpack(tokens, h, w)

    return draw


# --- the pipeline -----------------------------------------------------------------------------
def _repeat(cond: Condition, n: int) -> Condition:
    """Each row ``n`` times in a row: (p0, p0, p1, p1), as the stock pipelines order images."""
    return Condition(cond.tokens.repeat_interleave(n, 0), cond.pooled.repeat_interleave(n, 0))


class ScaleWisePipeline:
    """Scale-wise sampling over a loaded diffusers SD3 / SD3.5 or FLUX pipeline.

    Args:
        pipeline: a ``StableDiffusion3Pipeline`` or ``FluxPipeline`` (components shared).
        max_sequence_length: T5 tokens per prompt; None: the stock pipeline's default (SD3 256,
            FLUX 512), or the length a LoRA loaded from ``swd distill`` was trained with.
    """

    def __init__(self, pipeline, max_sequence_length: Optional[int] = None):
        self.pipeline = pipeline
        self.family = pipeline_family(pipeline)
        length = max_sequence_length or TEXT_LENGTHS[self.family]
        self.model = denoiser_from_pipeline(pipeline, ModelConfig(kind="diffusers", max_text_length=length))
        self.schedule: Optional[ScaleSchedule] = None  # default schedule (from a loaded swd LoRA)
        self.upsample_mode = "bicubic"  # default upsampling between stages (a loaded swd LoRA's own)
        self.lora_record: Optional[dict] = None

    @classmethod
    def from_pretrained(
        cls,
        pretrained: str | Path,
        lora: str | Path | None = None,
        torch_dtype: torch.dtype | str | None = None,
        variant: Optional[str] = None,
        revision: Optional[str] = None,
        **kwargs,
    ) -> "ScaleWisePipeline":
        """``DiffusionPipeline.from_pretrained`` (hub id or directory), then the optional LoRA."""
        dtype = parse_dtype(torch_dtype) if isinstance(torch_dtype, str) else torch_dtype
        pipeline = DiffusionPipeline.from_pretrained(pretrained, torch_dtype=dtype, variant=variant, revision=revision, **kwargs)
        pipe = cls(pipeline)
        if lora is not None:
            pipe.load_lora(lora)
        return pipe

    # --- plumbing -------------------------------------------------------------------------
    def to(self, *args, **kwargs) -> "ScaleWisePipeline":
        self.pipeline.to(*args, **kwargs)
        return self

    @property
    def device(self) -> torch.device:
        return self.pipeline._execution_device

    @property
    def transformer(self):
        return self.pipeline.transformer

    @property
    def max_sequence_length(self) -> int:
        return self.model.conditioner.max_length

    @max_sequence_length.setter
    def max_sequence_length(self, value: int) -> None:
        self.model.conditioner.max_length = int(value)

    def set_progress_bar_config(self, **kwargs) -> None:
        self.pipeline.set_progress_bar_config(**kwargs)

    def load_lora(self, path: str | Path, adapter_name: str = STUDENT) -> "ScaleWisePipeline":
        """Load and activate a LoRA (see :func:`swd.student.load_lora`). An ``swd distill`` LoRA also sets the
        default schedule and the text length it was distilled with."""
        record = load_lora(self.transformer, path, adapter_name)
        if record is not None:
            self.lora_record = record
            if "schedule" in record:
                self.schedule, self.upsample_mode = schedule_of(record), upsample_mode_of(record)
            length = (record.get("model") or {}).get("max_text_length")
            if length:
                self.max_sequence_length = length
        return self

    @property
    def default_guidance(self) -> float:
        """1.0 (a distilled student samples unguided), or FLUX's default guidance embedding."""
        if self.family == "flux" and self.model.embeds_guidance:
            return float(self.model.guidance)
        return 1.0

    def make_schedule(self, scales: Optional[Sequence[SizeLike]], sigmas: Optional[Sequence[float]]) -> ScaleSchedule:
        """The validated schedule; None takes the loaded LoRA's (or the authors' 4-step) values."""
        default = self.schedule or ScaleSchedule(*DEFAULT_SCHEDULES[self.family])
        schedule = ScaleSchedule(
            default.sizes if scales is None else scales,
            default.sigmas if sigmas is None else sigmas,
        )
        self.model.check_schedule(schedule)
        return schedule

    def _conditions(self, prompt, prompt_embeds, pooled_prompt_embeds, negative_prompt_embeds,
                    negative_pooled_prompt_embeds, guidance: float, n: int) -> tuple[Condition, Optional[Condition]]:
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("pass either `prompt` or `prompt_embeds` (with `pooled_prompt_embeds`), not both or neither")
        if prompt is not None:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            cond = self.model.condition(prompts)
        else:
            if pooled_prompt_embeds is None:
                raise ValueError("`prompt_embeds` needs `pooled_prompt_embeds` too")
            cond = Condition(prompt_embeds.to(self.device), pooled_prompt_embeds.to(self.device))
        null = None
        if self.model.needs_null_condition(guidance):
            if negative_prompt_embeds is not None:
                if negative_pooled_prompt_embeds is None:
                    raise ValueError("`negative_prompt_embeds` needs `negative_pooled_prompt_embeds` too")
                null = Condition(negative_prompt_embeds.to(self.device), negative_pooled_prompt_embeds.to(self.device))
            else:
                null = self.model.null_condition(len(cond))  # the empty prompt, as the stock pipelines
            if null.tokens.shape[1:] != cond.tokens.shape[1:]:
                raise ValueError(
                    f"negative embeddings {tuple(null.tokens.shape)} do not match the prompt embeddings "
                    f"{tuple(cond.tokens.shape)}; pass `negative_prompt_embeds` encoded like `prompt_embeds`"
                )
            null = _repeat(null, n)
        return _repeat(cond, n), null

    # --- sampling -------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        *,
        prompt_embeds: Optional[torch.Tensor] = None,
        pooled_prompt_embeds: Optional[torch.Tensor] = None,
        negative_prompt_embeds: Optional[torch.Tensor] = None,
        negative_pooled_prompt_embeds: Optional[torch.Tensor] = None,
        scales: Optional[Sequence[SizeLike]] = None,
        sigmas: Optional[Sequence[float]] = None,
        guidance_scale: Optional[float] = None,
        guidance_interval: Optional[tuple[float, float]] = None,
        num_images_per_prompt: int = 1,
        generator: Generator = None,
        output_type: str = "pil",
        upsample_mode: Optional[str] = None,
        callback: Callback = None,
        return_dict: bool = True,
    ):
        """Sample images; ``scales`` are latent sizes, ``sigmas`` has one more value, ending in 0.
        ``upsample_mode`` None: the loaded student's own (what it was distilled with), else bicubic.

        ``guidance_scale`` None: unguided for SD3 (a distilled student), the default embedded
        guidance for FLUX; otherwise classifier-free guidance with the empty prompt (SD3) or the
        guidance embedding (guidance-distilled FLUX). ``guidance_interval`` ``(lo, hi)``: classifier-free
        guidance only at steps whose sigma lies in it, unguided elsewhere (not for embedded guidance). ``output_type``: "pil", "np", "pt", or
        "latent" for the (B, C, H, W) float32 latents (FLUX unpacked).

        Between stages the latent stays float32 (the model sees its own dtype), so fp16 / bf16
        results differ slightly from the stock pipelines, which round it to the model dtype.
        Unlike the stock pipelines, every stage's noise comes from ``generator`` (they draw the
        scheduler's step noise from the global RNG of the model's device).
        """
        schedule = self.make_schedule(scales, sigmas)
        upsample_mode = upsample_mode or self.upsample_mode
        if upsample_mode not in UPSAMPLE_MODES:
            raise ValueError(f"unknown upsample_mode {upsample_mode!r}; choose one of {UPSAMPLE_MODES}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"unknown output_type {output_type!r}; choose one of {OUTPUT_TYPES}")
        if num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be >= 1, got {num_images_per_prompt}")
        guidance = self.default_guidance if guidance_scale is None else float(guidance_scale)
        cond, null = self._conditions(prompt, prompt_embeds, pooled_prompt_embeds, negative_prompt_embeds,
                                      negative_pooled_prompt_embeds, guidance, num_images_per_prompt)
        device = self.device
        h, w = schedule.sizes[0]
        # initial latents as the stock pipelines draw them: (B, C, h, w) in the embeddings' dtype
        noise = randn_tensor((len(cond), self.model.channels, h, w), generator=generator, device=device, dtype=cond.tokens.dtype)
        velocity_fn = limited_guidance_velocity(self.model, cond, null, guidance,
                                                None if guidance_interval is None else check_guidance_interval(guidance_interval))
        with self.pipeline.progress_bar(total=schedule.num_steps) as bar:

            def on_step(info: dict) -> None:
                bar.update()
                if callback is not None:
                    callback(info)

            latents = sample_scalewise(velocity_fn, noise.float(), schedule, step_noise_fn(self.family, generator, device),
                                       upsample_mode, on_step)  # (B, C, H, W) float32
        if output_type == "latent":
            images = latents
        else:
            images = self.pipeline.image_processor.postprocess(self.model.decode(latents), output_type=output_type)
        self.pipeline.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)

"""Sampling a Denoiser: the teacher's guided Euler ODE and scale-wise schedules.

Thin glue between a model, its conditions and the pure samplers in :mod:`swd.sampling`.
:class:`Sampler` is what a command decides once (mode, schedule, guidance) and then applies to
every batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .models import Denoiser
from .models.conditioning import ConditionValues
from .sampling import Callback, check_guidance_interval, generator_noise, in_interval, interval_velocity, randn, sample_euler, sample_scalewise
from .schedule import ScaleSchedule, SizeLike, as_size, teacher_sigmas

SAMPLING_MODES = ("teacher", "scalewise")


Interval = Optional[tuple[float, float]]  # noise levels [lo, hi] that are guided; None: every step


def conditioned_velocity(model: Denoiser, values: ConditionValues, guidance: float, interval: Interval = None):
    """``(x, sigma) -> v`` for these condition values with ``guidance`` (null pass only if needed),
    applied only at noise levels inside ``interval`` when one is given (unguided, 1.0, elsewhere)."""
    cond = model.condition(values)
    null = model.null_condition(len(values)) if model.needs_null_condition(guidance) else None
    return limited_guidance_velocity(model, cond, null, guidance, interval)


def limited_guidance_velocity(model: Denoiser, cond, null, guidance: float, interval: Interval = None):
    """``model.velocity_fn(cond, null, guidance)``, guided only inside ``interval`` (if one is given).

    Classifier-free guidance only: a model that embeds guidance (FLUX.1-dev) is refused, since its
    "unguided" steps would still carry an embedded scale.
    """
    guided = model.velocity_fn(cond, null, guidance)
    if interval is None or guidance == 1.0:
        return guided
    if not model.needs_null_condition(guidance):
        raise ValueError("a guidance interval limits classifier-free guidance; this model embeds guidance (FLUX.1-dev): "
                         "leave the guidance interval unset")
    return interval_velocity(guided, model.velocity_fn(cond, None, 1.0), interval)


def model_device(model: Denoiser) -> torch.device:
    return next(model.transformer.parameters()).device


@torch.no_grad()
def generate_teacher(
    model: Denoiser,
    values: ConditionValues,
    size: SizeLike,
    generator: torch.Generator,
    steps: int = 28,
    shift: float = 3.0,
    guidance: float = 1.0,
    callback: Callback = None,
    guidance_interval: Interval = None,
) -> torch.Tensor:
    """Full-resolution guided Euler sampling on the shifted teacher grid; returns (B, C, H, W)."""
    model.check_size(size)
    h, w = as_size(size)
    noise = randn((len(values), model.channels, h, w), generator, model_device(model))
    return sample_euler(conditioned_velocity(model, values, guidance, guidance_interval), noise, teacher_sigmas(steps, shift), callback)


@torch.no_grad()
def generate_scalewise(
    model: Denoiser,
    values: ConditionValues,
    schedule: ScaleSchedule,
    generator: torch.Generator,
    guidance: float = 1.0,
    upsample_mode: str = "bicubic",
    callback: Callback = None,
    guidance_interval: Interval = None,
) -> torch.Tensor:
    """Scale-wise sampling of ``schedule``; returns (B, C, H, W) at the final size."""
    model.check_schedule(schedule)
    device = model_device(model)
    noise = randn((len(values), model.channels, *schedule.sizes[0]), generator, device)
    return sample_scalewise(conditioned_velocity(model, values, guidance, guidance_interval), noise, schedule,
                            generator_noise(generator, device), upsample_mode, callback)


COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")


def compile_for_sampling(model: Denoiser, backend: str | None) -> Denoiser:
    """``torch.compile`` the model's transformer in place (``nn.Module.compile``, so the module and
    its hooks stay as they are) for repeated sampling; ``backend`` None leaves the model eager.

    Static shapes: each image size and batch compiles once, on its first call (the shipped
    teacher's 4-size schedule took about a minute on a 2-core CPU), and later calls at that size run
    the compiled graph. It pays where the same sizes are sampled many times (long samplers,
    benchmarks), not for a short run.
    """
    check_compile_backend(backend)
    if backend is not None:
        options = compile_options(backend, model_device(model))
        model.transformer.compile(backend=backend, dynamic=False, **({"options": options} if options else {}))
    return model


def compile_options(backend: str, device: torch.device) -> dict:
    """Inductor options for sampling on ``device``.

    On CPU, inductor's C++ wrapper (``cpp_wrapper``) launches the generated kernels from C++
    instead of a Python wrapper, which removes a fixed cost per forward that small batches feel:
    on the shipped teacher at batch 8 (one thread) the 4-step scale-wise / full-resolution sampling
    ratio was 0.551 / 0.547 with it against 0.553 / 0.550 with the Python wrapper, and SwD-4 2%
    faster per image (results/bench_b8_cpp_wrapper.json). Its C++ build made the first compile of
    five sizes take about a minute here. Other devices keep inductor's defaults.
    """
    if backend == "inductor" and torch.device(device).type == "cpu":
        return {"cpp_wrapper": True}
    return {}


def check_compile_backend(backend: str | None) -> None:
    """Refuse an unknown ``compile`` value (callers check before loading a model)."""
    if backend is not None and backend not in COMPILE_BACKENDS:
        raise ValueError(f"unknown compile backend {backend!r}; use one of {', '.join(COMPILE_BACKENDS)} (or null for eager)")


def network_evaluations(steps: int, guidance: float, guided_steps: int | None = None) -> int:
    """Forward passes per image: a guided step costs two (``guided_steps``: how many of the
    ``steps`` are guided; None: all of them)."""
    if guidance == 1.0:
        return steps
    return steps + (steps if guided_steps is None else guided_steps)


@dataclass(frozen=True)
class Sampler:
    """How a command samples, decided once: the teacher's guided Euler ODE on the shifted grid
    (``steps``, ``shift``, at ``schedule``'s final size) or the scale-wise ``schedule``."""

    mode: str  # "teacher" or "scalewise"
    schedule: ScaleSchedule
    guidance: float
    teacher_steps: int = 28
    shift: float = 3.0
    upsample_mode: str = "bicubic"
    guidance_interval: Interval = None  # guide only the steps whose sigma lies in [lo, hi]; None: every step

    def __post_init__(self) -> None:
        if self.mode not in SAMPLING_MODES:
            raise ValueError(f"unknown sampling mode {self.mode!r}; use 'teacher' or 'scalewise'")
        if self.guidance_interval is not None:
            object.__setattr__(self, "guidance_interval", check_guidance_interval(self.guidance_interval))

    @property
    def steps(self) -> int:
        return self.teacher_steps if self.mode == "teacher" else self.schedule.num_steps

    @property
    def step_sigmas(self) -> list[float]:
        """The noise level of each step's input."""
        if self.mode == "teacher":
            return [float(s) for s in teacher_sigmas(self.teacher_steps, self.shift)[:-1]]
        return list(self.schedule.sigmas[:-1])

    @property
    def guided_steps(self) -> int:
        """How many steps run guided (all of them without an interval; none at guidance 1)."""
        if self.guidance == 1.0:
            return 0
        if self.guidance_interval is None:
            return self.steps
        return sum(in_interval(s, self.guidance_interval) for s in self.step_sigmas)

    @property
    def nfe(self) -> int:
        return network_evaluations(self.steps, self.guidance, self.guided_steps)

    def __call__(self, model: Denoiser, values: ConditionValues, generator: torch.Generator, callback: Callback = None) -> torch.Tensor:
        """One batch of images in [-1, 1] (sizes are in the model's space: latents for pipeline
        teachers, then decoded)."""
        if self.mode == "teacher":
            x = generate_teacher(model, values, self.schedule.final_size, generator, self.teacher_steps, self.shift, self.guidance, callback,
                                 self.guidance_interval)
        else:
            x = generate_scalewise(model, values, self.schedule, generator, self.guidance, self.upsample_mode, callback,
                                   self.guidance_interval)
        return model.decode(x)


def condition_values_for(model: Denoiser, n: int, labels=None, prompts=None) -> ConditionValues:
    """Labels (cycling through the classes unless given) or prompts (cycled) for ``n`` images."""
    k = model.num_classes
    if k is not None:
        if labels:
            bad = [x for x in labels if not 0 <= int(x) < k]
            if bad:
                raise ValueError(f"labels {bad} are outside 0..{k - 1}")
            return torch.tensor([int(labels[i % len(labels)]) for i in range(n)])
        return torch.arange(n) % k
    if not prompts:
        raise ValueError("this model is text-conditioned: give sample.prompts=[\"a prompt\", ...] or sample.prompts=FILE")
    return [prompts[i % len(prompts)] for i in range(n)]


PREVIEW_PROMPTS = ["a photo"]


def preview_values(model: Denoiser, captions: Sequence[str] | None = None) -> tuple[ConditionValues, int]:
    """Conditions of a training preview grid and its images per row: ten of every class (one
    column per class), or 16 images of the first training ``captions`` (a generic caption without)."""
    if model.num_classes is not None:
        return condition_values_for(model, 10 * min(model.num_classes, 10)), min(model.num_classes, 10)
    return condition_values_for(model, 16, prompts=list(captions or [])[:16] or PREVIEW_PROMPTS), 4

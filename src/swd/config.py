"""Configuration: nested dataclasses, loaded from YAML, overridden with ``key.sub=value``.

Every command saves the resolved config (``config.yaml``) beside what it writes, so any output
can be reproduced.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union, get_args, get_origin, get_type_hints

import yaml

# The paper's 4-step schedule for the built-in 32 px teacher (spec sections 2-3): sigmas of grid
# indices 0/7/14/18 of the 28-step, shift-3 teacher grid, rounded to 4 decimals as published
# (``ScaleSchedule.from_grid(SWD4_SIZES, SWD4_GRID_INDICES)`` derives them; a test checks the rounding).
# Kept here, not in swd.schedule, so that loading a config does not import torch.
DEMO_CONFIG = Path(__file__).parent / "assets" / "demo.yaml"  # what `swd demo` runs without --config

SWD4_SIZES = (16, 20, 24, 32)
SWD4_GRID_INDICES = (0, 7, 14, 18)
SWD4_SIGMAS = (1.0, 0.8959, 0.7371, 0.6022, 0.0)
FLUX_SWD4_SIGMAS = (1.0, 0.8956, 0.7363, 0.6007, 0.0)  # the authors' FLUX schedule (spec section 3)


@dataclass
class ModelConfig:
    """The backbone and its conditioning."""

    kind: str = "sd3"  # "sd3": the built-in pixel-space SD3Transformer2DModel; "diffusers": a pipeline teacher
    pretrained: Optional[str] = None  # hub id or local directory of a diffusers SD3 / SD3.5 / FLUX pipeline
    torch_dtype: Optional[str] = None  # pipeline teachers: "bfloat16", "float16", "float32" (None: as saved)
    variant: Optional[str] = None  # pipeline teachers: weight variant, e.g. "fp16"
    revision: Optional[str] = None  # pipeline teachers: hub revision
    embedded_guidance: float = 3.5  # FLUX guidance-distilled models: the default guidance embedding
    sample_size: Union[int, list[int]] = 32  # final image side in pixels (pixel-space built-in model); [h, w] for pipeline data
    patch_size: int = 2
    in_channels: int = 1  # 1 for Fashion-MNIST, 3 for RGB folders
    num_layers: int = 6
    attention_head_dim: int = 32
    num_attention_heads: int = 4
    joint_attention_dim: int = 128  # width of condition tokens
    caption_projection_dim: int = 128
    pooled_projection_dim: int = 128
    pos_embed_max_size: int = 16  # max tokens per side; max image side = this * patch_size
    conditioning: str = "class"  # "class" (learned label tokens) or "text" (a transformers encoder)
    num_classes: int = 10  # class conditioning: labels 0..num_classes-1, num_classes = null class
    num_condition_tokens: int = 4  # class conditioning: tokens per label
    text_encoder: Optional[str] = None  # text conditioning: local path or hub id of a transformers encoder
    max_text_length: int = 32  # text conditioning: tokens kept per caption (T5 tokens for pipeline teachers)


@dataclass
class DataConfig:
    kind: str = "fashion_mnist"  # "fashion_mnist" or "folder" (images + metainfo.csv; a label column for class-conditioned models)
    root: Optional[str] = None  # fashion_mnist: idx file dir (default: Debian's); folder: the folder
    download: bool = False  # fashion_mnist only: fetch the files if missing
    cache_dir: Optional[str] = None  # distill: keep the teacher's encodings (latents per stage size, prompt
    # embeddings) of every training item here, computed once; for pipeline teachers with frozen encoders


@dataclass
class ScheduleConfig:
    """The scale-wise schedule: n sizes and n + 1 sigmas ending in 0."""

    sizes: list[Union[int, list[int]]] = field(default_factory=lambda: list(SWD4_SIZES))  # an int (square) or [height, width] each
    sigmas: list[float] = field(default_factory=lambda: list(SWD4_SIGMAS))
    upsample_mode: str = "bicubic"


@dataclass
class TeacherSamplingConfig:
    steps: int = 28  # Euler steps on the shifted grid
    shift: float = 3.0  # FlowMatchEulerDiscreteScheduler shift
    guidance: float = 3.0  # classifier-free guidance scale (1 = off)


@dataclass
class PretrainConfig:
    steps: int = 4000
    batch_size: int = 64
    lr: float = 5e-4
    weight_decay: float = 0.0
    warmup_steps: int = 200
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    cond_drop_prob: float = 0.1  # labels/captions dropped to the null condition (for guidance)
    logit_mean: float = 0.0  # training sigmas ~ sigmoid(N(logit_mean, logit_std)) (SD3)
    logit_std: float = 1.0
    multiscale: bool = True  # rotate batches over every size of the schedule
    mixed_precision: str = "no"  # accelerate: "no", "fp16", "bf16"
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    sample_every: int = 500
    log_every: int = 20


@dataclass
class LoraConfig:
    """The student and critic adapters (peft LoRA on the teacher's transformer, spec section 7)."""

    rank: int = 64
    alpha: Optional[int] = None  # None: equal to the rank
    targets: Union[str, list[str], None] = None  # peft target_modules: name suffixes or one regex; None: the backbone adapter's attention + MLP set


@dataclass
class OptimConfig:
    """AdamW for the student and for the critic (adapter + GAN head)."""

    lr: float = 5e-6  # student
    critic_lr: float = 5e-6
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.01
    eps: float = 1e-8
    grad_clip: float = 10.0  # max gradient norm per update; 0 = off


@dataclass
class LossConfig:
    """The objective (spec section 5): generator loss ``mmd_weight * MMD + dmd_weight * DMD +
    gan_weight * GAN`` (+ ``teacher_regression_weight`` / ``real_regression_weight`` * the optional
    regressions below), any weight
    may be 0; critic loss ``critic_regression_weight * regression +
    critic_gan_weight * GAN``."""

    mmd_weight: float = 1.0
    dmd_weight: float = 1.0
    gan_weight: float = 0.005  # generator GAN term
    critic_gan_weight: float = 0.01  # discriminator term in the critic loss
    critic_regression_weight: float = 1.0
    dmd_guidance: float = 4.5  # teacher classifier-free guidance inside DMD
    mmd_kernel: str = "linear"  # "linear" (pseudo-Huber on mean features) or "rbf"
    mmd_huber_c: float = 0.001
    mmd_rbf_bandwidth: float = 100.0
    # stages (0-based) that take the MMD term; None: every stage. At a stage whose input is pure
    # noise (sigma 1) the per-image MMD can only pull each sample toward the features of an unrelated
    # real image of its condition, that is toward their mean: leaving it out keeps the first step's variety
    mmd_stages: Optional[list[int]] = None
    # Not in the spec (0: off, the spec's objective): the student's x0 regressed onto the guided
    # teacher's one-step prediction from the student's own input at the stage (guidance dmd_guidance),
    # the one step the undistilled scale-wise sampler takes there. It distils the guidance itself, as
    # guidance distillation does. Measured on the Twemoji student it lowered prompt alignment (weights
    # 1 and 10; results/text_alignment_study.json, rows treg1 / treg10): kept as an opt-in for study.
    teacher_regression_weight: float = 0.0
    # Not in the spec: how many guided Euler steps of the teacher make that regression's target.
    # 1 (the default) is the one-step prediction above. N > 1 solves the teacher's ODE from the
    # student's input at the stage's sigma down to 0 in N steps on the loss grid (distill.noise), as
    # DMD's regression onto teacher ODE pairs does (Yin et al. 2024), made on the fly: a sharp
    # sample of the guided teacher instead of its blurred mean. It costs N guided teacher forwards.
    teacher_regression_steps: int = 1
    # stages (0-based) that take the teacher regression; None: every stage
    teacher_regression_stages: Optional[list[int]] = None
    # Not in the spec either (0: off): the student's x0 regressed (mse) onto the stage's real target,
    # the caption's (or class's) own training image at the stage size. It is the paired term the MMD
    # lacks: the linear MMD compares token means and the per-image pairing is lost. It needs no
    # extra forward (the student's x0 is already made from that image's noised input); an opt-in for study.
    real_regression_weight: float = 0.0
    # Not in the spec (0: off): self-guidance. At the stages listed (None: every stage) the student's
    # conditional x0 is pushed along its own guidance direction, towards
    # sg(x0_uncond + self_guidance_scale * (x0_cond - x0_uncond)) from the same input (one extra
    # no-grad forward with the null condition), so that it samples unguided as it would guided at
    # that scale. Sampling the 4-step Twemoji student with guidance 2.0 at its last step alone
    # (sample.guidance_interval) raised alignment most; this distils that step's guidance. LoRA students.
    self_guidance_weight: float = 0.0
    self_guidance_scale: float = 2.0
    self_guidance_stages: Optional[list[int]] = None


@dataclass
class NoiseConfig:
    """Where each loss draws its noise levels: inclusive index ranges on the teacher's grid."""

    grid_steps: int = 28  # the teacher grid the loss noise levels are drawn from
    grid_shift: float = 3.0
    dmd_indices: list[int] = field(default_factory=lambda: [12, 27])
    mmd_indices: list[int] = field(default_factory=lambda: [18, 27])  # sigma <= 0.6
    critic_indices: list[int] = field(default_factory=lambda: [0, 27])


@dataclass
class CriticConfig:
    """The fake model (a second adapter on the teacher) and its GAN head; built only when DMD or GAN is on."""

    updates: int = 5  # critic updates per generator update
    feature_block: Optional[int] = None  # block for GAN and MMD features; None: the middle block
    head_layers: int = 4  # GAN head depth


@dataclass
class DistillConfig:
    """``swd distill``: a few-step (scale-wise) student from a teacher (spec sections 5-7).

    The groups: ``lora`` (adapters), ``optim`` (AdamW), ``loss`` (weights and kernels of the
    objective), ``noise`` (the grid and the index ranges each loss draws from), ``critic``.
    """

    teacher: str = "teacher"  # swd model directory, "teacher" (shipped), or a diffusers SD3 / FLUX pipeline (directory or hub id)
    mode: str = "scalewise"  # "scalewise" (schedule sizes) or "fullres" (every stage at the final size)
    steps: int = 3000  # generator updates
    batch_size: int = 32  # global batch (split across processes)
    student: str = "lora"  # "lora" (adapter on the frozen teacher) or "full" (fine-tune a copy; small models)
    lora: LoraConfig = field(default_factory=LoraConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    # the share of generator steps (0..1, a step-seeded draw) whose stage input is made from the
    # student's OWN earlier stages, as at sampling time (DMD2's backward simulation), instead of the
    # real image's previous size; the target stays the real image. 0: the spec's training inputs
    backward_simulation: float = 0.0
    mixed_precision: str = "no"  # accelerate: "no", "fp16", "bf16"
    # several processes: "ddp" (every process holds the whole model; the adapters' and head's gradients
    # are all-reduced) or "fsdp" (torch FSDP2: the frozen base, both adapters and the GAN head are
    # sharded across the processes, each transformer block gathered only while it runs; LoRA students,
    # no fp16, adapters not folded). One process: no sharding, the same update either way
    distributed: str = "ddp"
    gradient_checkpointing: bool = False
    # run LoRA forwards on base weights with the adapter folded in where that is cheaper (fp32 bases
    # only: always when the adapter is frozen, in training when it saves products; see
    # swd.distill.adapters): the same function up to float rounding, one folded copy of the adapted
    # weights held. "auto": only where LoRA's extra products are >= 10% of the base's (narrow layers
    # at a high rank, e.g. the built-in models; not SD3.5 / FLUX, where the copy costs more than it saves)
    fold_adapters: Union[bool, str] = "auto"
    # exponential moving average of the student's trainable weights (e.g. 0.99); the export and the
    # preview grids use it, training uses the raw student. None: no average
    ema_decay: Optional[float] = None
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    sample_every: int = 200
    log_every: int = 10
    max_minutes: Optional[float] = None  # stop (checkpoint + export) after this much wall time
    skip_nonfinite: int = 0  # NaN/Inf loss: skip up to this many steps (counted in train_summary.json), then stop; 0 = stop at once


@dataclass
class SampleConfig:
    num_images: int = 64
    batch_size: int = 64
    seed: int = 0
    mode: Optional[str] = None  # "teacher" (Euler, CFG), "scalewise" (the schedule section) or "student"
    # (a distilled checkpoint's own schedule); None: "student" for distilled checkpoints, else "teacher"
    guidance: Optional[float] = None  # None: 1.0 for distilled checkpoints, else teacher.guidance
    guidance_interval: Optional[list[float]] = None  # [lo, hi]: guide only steps whose sigma is in it (unguided elsewhere); None: every step
    labels: Optional[list[int]] = None  # class conditioning; None: cycle through the classes
    prompts: Union[str, list[str], None] = None  # text conditioning: a list of prompts, or a text file (one prompt per line)
    intermediates: bool = False  # also save the per-step strip
    nrow: Optional[int] = None
    compile: Optional[str] = None  # torch.compile backend for the transformer ("inductor"); None: eager (swd.generate.compile_for_sampling)


@dataclass
class EvalConfig:
    """``swd eval``: FID, precision / recall / density / coverage, class accuracy (class models) or
    CLIP score (text models), seconds per image."""

    num_samples: int = 2000
    batch_size: int = 250
    seed: int = 0
    mode: Optional[str] = None  # as sample.mode
    guidance: Optional[float] = None  # as sample.guidance
    guidance_interval: Optional[list[float]] = None  # as sample.guidance_interval
    fid_batch_size: int = 100  # images per Inception (and CLIP) batch
    reference_images: int = 10000  # Fashion-MNIST test images behind the FID reference (cached); without eval.reference
    classifier: Optional[str] = None  # None: the classifier shipped with swd
    prompts: Optional[str] = None  # text models: .txt (one prompt per line) or .csv (caption / prompt column); image i gets prompt i % len
    reference: Optional[str] = None  # FID reference: a folder of real images (statistics cached) or an .npz (mu, sigma); None: Fashion-MNIST test set
    resolution: Optional[int] = None  # real and generated images are brought to this size (px) before Inception; None: as they are
    clip: Optional[str] = None  # CLIP model (directory or hub id) for the CLIP score of text models; None: no CLIP score
    pr_k: int = 5  # nearest neighbours of precision / recall / density / coverage (Naeem et al. 2020)
    twemoji_scorer: Optional[str] = None  # Twemoji prompts: "shipped" (the scorer in swd) or a scorer directory adds
    # subcategory accuracy and caption retrieval top-1 / top-5 (swd.metrics.twemoji_scorer); None: not measured


@dataclass
class BenchConfig:
    """``swd bench``: side-by-side timing of samplers and distillation iterations."""

    batch_size: int = 64
    repeats: int = 5  # timed rounds of sampling (median)
    warmup: int = 1  # untimed sampling rounds first
    train_repeats: int = 3  # timed rounds of training; a round is one iteration per stage
    compile: Optional[str] = None  # torch.compile backend of the sampling model ("inductor"); None: eager. The
    # untimed warmup rounds compile every size, so it needs warmup >= 1; training stays eager


@dataclass
class MakeDataConfig:
    """``swd make-data``: a training set of teacher samples (images + metainfo.csv, spec section 5).

    The teacher (``checkpoint`` or ``model.pretrained``) samples with ``teacher.steps`` /
    ``teacher.shift`` / ``teacher.guidance`` at the schedule's final size.
    """

    prompts: Optional[str] = None  # text file, one prompt per line (blank lines skipped); image i gets prompt i % len
    # (a class-conditioned teacher takes none: image i gets class i % num_classes)
    num_images: Optional[int] = None  # images the folder should hold (indices 0..n-1); None: one per prompt
    batch_size: int = 8  # images per teacher call, per process
    seed: int = 0  # image i starts from noise seeded seed + i (independent of batching and processes)
    output_dir: Optional[str] = None  # where images/ and metainfo.csv go; None: data.root (where distill reads)


@dataclass
class SpectralScheduleConfig:
    """``swd schedule``: a scale-wise schedule from the data's power spectrum (``swd.spectrum``).

    The data (``data.*``) is measured at the final size in the model's space (pixels, or a pipeline's
    VAE latents); the model (``checkpoint``, else ``model.pretrained``, else ``distill.teacher``) gives
    the patch size, the position-embedding limit and the VAE; sigmas are given, the config's
    ``schedule.sigmas``, or points of the teacher grid the distillation draws from
    (``distill.noise.grid_steps``, ``grid_shift``: 28 steps, shift 3).
    """

    steps: Optional[int] = None  # scale-wise steps; None: 4, or as many as sigmas gives
    sigmas: Optional[list[float]] = None  # n + 1 noise levels ending in 0 (only the sizes are derived); None: sigma_source
    sigma_source: str = "schedule"  # with sigmas None: "schedule" takes schedule.sigmas when they have `steps` steps (only
    # the sizes are derived; validated in results/schedule.json), else, and with "grid", `steps` grid points evenly
    # spaced in index from sigma 1 (index 0) to the grid point nearest last_sigma
    last_sigma: float = 0.6  # the last step's noise level on the grid (the paper's schedules end at 0.6022)
    tolerance: float = 0.2  # largest share of a step's signal above the noise that its size may hide
    token_ratio: Optional[float] = None  # budget: sum_i h_i w_i / (n H W); the smallest tolerance that fits replaces tolerance
    noise_floor: str = "step"  # "step": the noise is drawn at the step's size (sigma^2 HW / hw per final-size frequency bin),
    # as the scale-wise sampler does; "final": sigma^2, so a size hides only what lies above its Nyquist frequency
    min_ratio: float = 0.5  # smallest side as a share of the final side: steps whose signal is all under the noise
    # (sigma near 1) get no lower bound from the spectrum; the paper starts 2-4x below the final size (0.25-0.5)
    final_size: Union[int, list[int], None] = None  # model-space final size, [h, w] if not square; None: the last of schedule.sizes
    num_images: Optional[int] = None  # measure a seeded random subset of this many images; None: every image
    batch_size: int = 256  # images per measuring (and VAE encoding) batch


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    teacher: TeacherSamplingConfig = field(default_factory=TeacherSamplingConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    make_data: MakeDataConfig = field(default_factory=MakeDataConfig)
    spectral: SpectralScheduleConfig = field(default_factory=SpectralScheduleConfig)
    seed: int = 0
    output_dir: str = "runs/default"
    checkpoint: Optional[str] = None  # a model directory to load (sample / eval)
    device: Optional[str] = None  # None: what accelerate picks


# Keys renamed when DistillConfig was grouped; anything else that moved keeps its name (see _moved_to).
RENAMED = {
    "distill.lora_rank": "distill.lora.rank",
    "distill.lora_alpha": "distill.lora.alpha",
    "distill.lora_targets": "distill.lora.targets",
    "distill.adam_eps": "distill.optim.eps",
    "distill.critic_updates": "distill.critic.updates",
    "distill.gan_head_layers": "distill.critic.head_layers",
}


def is_hub_id(name: str | Path) -> bool:
    """A Hugging Face hub id ("org/name") that is no local path (model, pipeline or CLIP names)."""
    text = str(name)
    return not Path(text).exists() and text.count("/") == 1 and not text.startswith((".", "/"))


def _moved_to(cls, path: str, key: str) -> str | None:
    """Where an unknown ``path + key`` lives now: a renamed key, or a same-named field of a group."""
    if path + key in RENAMED:
        return RENAMED[path + key]
    for name, tp in get_type_hints(cls).items():
        if dataclasses.is_dataclass(tp) and key in {f.name for f in dataclasses.fields(tp)}:
            return f"{path}{name}.{key}"
    return None


def _describe(tp) -> str:
    """A type as a user reads it: ``list[int]`` -> "a list of integers"."""
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false", type(None): "null"}
    if tp in names:
        return names[tp]
    origin, args = get_origin(tp), get_args(tp)
    if tp is list or (origin is list and not args):
        return "a list"
    if origin is list:
        plural = {int: "integers", float: "numbers", str: "strings"}
        return f"a list of {plural[args[0]]}" if args[0] in plural else f"a list of items, each {_describe(args[0])}"
    if origin is Union:
        return " or ".join(_describe(a) for a in args)
    return getattr(tp, "__name__", str(tp))


class ConfigTypeError(ValueError):
    """A config value that does not parse as its field's type."""


def _hint(key: str, value: Any, expected) -> str:
    if isinstance(value, dict) and expected is str:
        return (" YAML read a 'key: value' inside it as a mapping: quote a prompt that holds a colon, "
                f"e.g. '{key.split('[')[0]}=[red apple, \"flag: France\"]'")
    return ""


def check_type(value: Any, tp, key: str) -> Any:
    """``value`` as field type ``tp`` (ints are accepted as floats), or a ConfigTypeError that
    names the key, the value and the expected type. Elements of lists are checked too."""
    if tp is Any:
        return value
    origin, args = get_origin(tp), get_args(tp)
    if origin is Union:
        if value is None and type(None) in args:
            return None
        closest = None  # the error of the member of the value's own kind (a list for a list), the most telling
        for arg in args:
            if arg is type(None):
                continue
            try:
                return check_type(value, arg, key)
            except ConfigTypeError as err:  # the next member of the union may accept it
                if isinstance(value, (list, tuple)) == (arg is list or get_origin(arg) is list):
                    closest = closest or err
        if closest is not None and isinstance(value, (list, tuple)):
            raise closest
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is list or origin is list:
        if isinstance(value, (list, tuple)):
            return [check_type(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)] if args else list(value)
    else:
        raise TypeError(f"config field {key} has a type the loader does not know: {tp}")
    raise ConfigTypeError(f"{key}={value!r} is not {_describe(tp)}.{_hint(key, value, tp)}")


def from_dict(cls, data: dict, path: str = ""):
    """``cls`` from a (possibly partial) mapping: unknown keys and ill-typed values are refused."""
    if not isinstance(data, dict):
        raise ValueError(f"config section {path.rstrip('.') or '<root>'} must be a mapping, got {type(data).__name__}")
    types = get_type_hints(cls)
    unknown = sorted(set(data) - set(types))
    if unknown:
        moved = {k: _moved_to(cls, path, k) for k in unknown}
        hints = "".join(f" {path}{k} is now {m}." for k, m in moved.items() if m)
        raise ValueError(f"unknown config key(s) {', '.join(path + k for k in unknown)}.{hints} Valid keys here: {', '.join(sorted(types))}")
    kwargs = {}
    for name, value in data.items():
        tp = types[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = from_dict(tp, value or {}, f"{path}{name}.")
        else:
            kwargs[name] = check_type(value, tp, path + name)
    return cls(**kwargs)


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``5e-6`` (no dot) as a string; learning rates are written that way, so
    exponent-only numbers are floats here too (the resolver PyYAML documents, plus that form)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def read_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"pretrain.lr=1e-4"`` -> (["pretrain", "lr"], 1e-4); the value is parsed as YAML."""
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    if not key:
        raise ValueError(f"override {text!r} has no key")
    return key.split("."), read_yaml(raw) if raw != "" else None


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {text!r}: {k} is not a section")
        node[keys[-1]] = value
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML file (or the defaults), apply overrides, validate every key."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist (see the configs/ folder for examples)")
        data = read_yaml(path.read_text()) or {}
    apply_overrides(data, overrides or [])
    return from_dict(Config, data)


def config_to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)


def save_config(config: Config, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
    return path

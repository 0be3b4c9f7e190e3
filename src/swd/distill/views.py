"""Student, critic and teacher as views of ONE frozen backbone (spec section 7).

The student and the critic ("fake model") are two peft LoRA adapters on the teacher's
transformer; the teacher is that transformer with adapters disabled. Memory holds one backbone,
two adapters and the GAN head. A full fine-tune of a student copy is an option for small models.

Each trainable part is wrapped in its own small module (``StudentView``, ``CriticView``) so that
accelerate can wrap each in DDP separately: a generator update all-reduces only the student's
gradients, a critic update only the critic's and the head's. Under FSDP (``distill.distributed``)
the views are instead roles of one sharded module (:mod:`swd.distill.fsdp`); :class:`Roles` is
how an iteration reaches each part in either case.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from peft import LoraConfig as PeftLoraConfig
from torch import nn
from torch.distributed.tensor import DTensor
from torch.func import functional_call

from ..config import DistillConfig, LoraConfig, LossConfig
from ..generate import generate_scalewise
from ..models import Denoiser
from ..models.conditioning import Condition, ConditionValues
from ..models.hooks import detach_after, stop_after
from ..schedule import ScaleSchedule, clean_from_velocity
from ..student import CRITIC, STUDENT
from .adapters import adapter_parameters, check_fold_setting, resolve_fold, use_adapter, weights_for_forward
from .ema import check_decay
from .gan import GANHead


def view_weights(denoiser: Denoiser, adapter: str | None, params: list[nn.Parameter], fold: bool) -> dict[str, torch.Tensor] | None:
    """Folded weights for a view's forwards now, or None for peft's LoRA path (with ``fold`` on,
    :func:`swd.distill.adapters.weights_for_forward` says when folding applies)."""
    return weights_for_forward(denoiser.transformer, adapter, params) if fold and adapter is not None else None


def adapter_denoise(denoiser: Denoiser, adapter: str | None, weights: dict[str, torch.Tensor] | None, x: torch.Tensor, sigma: torch.Tensor, cond) -> torch.Tensor:
    """``x0`` (B, C, h, w) from ``denoiser`` with ``adapter`` (None: adapters off): through peft's
    LoRA path when ``weights`` is None, else with adapters off on ``weights`` (the adapter folded
    into the base, :func:`view_weights`): the same function, one product per Linear instead of three.
    """
    transformer = denoiser.transformer
    if weights is None:
        use_adapter(transformer, adapter)
        return denoiser.denoise(x, sigma, cond)
    use_adapter(transformer, None)
    v = functional_call(denoiser, {f"transformer.{k}": w for k, w in weights.items()}, (x, sigma, cond))
    return clean_from_velocity(x, v, sigma)


class StudentView(nn.Module):
    """The student: the base with the student adapter, or a fully trainable copy."""

    def __init__(self, denoiser: Denoiser, adapter: str | None, fold: bool = True):
        super().__init__()
        self.denoiser = denoiser
        self.adapter = adapter
        self.fold = fold
        if adapter is None:
            params = [p for n, p in denoiser.named_parameters() if not n.startswith("conditioner.encoder.")]
        else:
            params = adapter_parameters(denoiser, adapter)
        self._trainable = params  # a plain list: these parameters are registered under ``denoiser``
        self._trainable_names = parameter_names(denoiser, params)

    @property
    def owns_conditioner(self) -> bool:
        """A full copy trains its own conditioner; a LoRA student shares the frozen one."""
        return self.adapter is None

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond) -> torch.Tensor:
        """Clean-sample prediction ``x0_hat`` (B, C, h, w)."""
        weights = view_weights(self.denoiser, self.adapter, self._trainable, self.fold)
        return adapter_denoise(self.denoiser, self.adapter, weights, x, sigma, cond)

    @torch.no_grad()
    def sample(self, values: ConditionValues, schedule: ScaleSchedule, generator: torch.Generator, upsample_mode: str) -> torch.Tensor:
        """Images (B, C, H, W) in [-1, 1] from the student on ``schedule``, unguided, in eval mode."""
        student = self.denoiser
        use_adapter(student.transformer, self.adapter)
        was_training = student.training
        student.eval()
        images = student.decode(generate_scalewise(student, values, schedule, generator, 1.0, upsample_mode))
        student.train(was_training)
        return images

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self._trainable)

    def rebind(self) -> None:
        """Take the trainable parameters again by name (FSDP replaces a module's parameters with sharded ones)."""
        self._trainable = [self.denoiser.get_parameter(n) for n in self._trainable_names]


class CriticOutput(NamedTuple):
    x0: torch.Tensor  # (B, C, h, w) the fake model's clean-sample prediction
    features: torch.Tensor  # (B, L, C') image-token features of the feature block
    logits: torch.Tensor | None  # (B,) GAN head on ``features``; None without a head
    real_logits: torch.Tensor | None  # (B,) GAN head on the real inputs' features, if they were given


class CriticView(nn.Module):
    """The fake model (base + critic adapter) and the GAN head: x0, block features and logits from one forward.

    Forwards that only need block features stop right after the feature block
    (:func:`swd.models.hooks.stop_after`): the later blocks and the output layer neither run nor
    back-propagate.
    """

    def __init__(self, denoiser: Denoiser, adapter: str | None, head: GANHead | None, feature_block: int, fold: bool = True):
        super().__init__()
        self.denoiser = denoiser
        self.adapter = adapter
        self.head = head
        self.feature_block = feature_block
        self.fold = fold
        self._adapter_params = adapter_parameters(denoiser, adapter) if adapter else []
        self._adapter_names = parameter_names(denoiser, self._adapter_params)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: Condition, real: torch.Tensor | None = None,
                x0_grad: bool = True) -> CriticOutput:
        """Full forward on ``x`` (B, C, h, w). With ``real`` (B, C, h, w) at the same ``sigma`` and
        ``cond``, also the GAN logits of the real inputs, from a features-only forward in this same
        call (a DDP-wrapped critic is then called once per update).

        ``x0_grad=False`` (a frozen critic whose ``x0`` is only read, as DMD's fake score in the
        generator update): the blocks after the feature block run outside the autograd graph, so
        they keep no activations; gradients still reach ``x`` through the features and logits.
        The returned ``x0`` then carries no graph through those blocks (detach it before use).
        """
        if real is not None and self.head is None:
            raise ValueError("real inputs only give logits, and this critic has no GAN head")
        weights = self._weights()  # folded once for both forwards of this call
        block = self.denoiser.blocks[self.feature_block]
        with self.denoiser.block_features([self.feature_block]) as captured, \
                (contextlib.nullcontext() if x0_grad else detach_after(block)):
            x0 = adapter_denoise(self.denoiser, self.adapter, weights, x, sigma, cond)
        features = captured[0]  # (B, L, C')
        if self.head is None:
            return CriticOutput(x0, features, None, None)
        if real is None:
            return CriticOutput(x0, features, self.head(features), None)
        real_features = self._features_only(real, sigma, cond, weights)  # (B, L, C')
        logits = self.head(torch.cat([features, real_features]))  # (2B,)
        return CriticOutput(x0, features, logits[: len(x)], logits[len(x):])

    def features_only(self, x: torch.Tensor, sigma: torch.Tensor, cond: Condition) -> torch.Tensor:
        """Block features (B, L, C') of ``x``; the forward stops at the feature block."""
        return self._features_only(x, sigma, cond, self._weights())

    def _features_only(self, x: torch.Tensor, sigma: torch.Tensor, cond: Condition, weights: dict[str, torch.Tensor] | None) -> torch.Tensor:
        block = self.denoiser.blocks[self.feature_block]
        with self.denoiser.block_features([self.feature_block]) as captured, stop_after(block) as stop:
            adapter_denoise(self.denoiser, self.adapter, weights, x, sigma, cond)  # the full forward's entry point; never returns here
        if not stop.stopped or captured[0] is None:
            raise RuntimeError(f"the forward finished without running feature block {self.feature_block}")
        return captured[0]

    def logits_only(self, x: torch.Tensor, sigma: torch.Tensor, cond: Condition) -> torch.Tensor:
        """GAN logits (B,) of ``x`` from a features-only forward (when x0 is not needed)."""
        if self.head is None:
            raise ValueError("this critic has no GAN head")
        return self.head(self.features_only(x, sigma, cond))

    def _weights(self) -> dict[str, torch.Tensor] | None:
        return view_weights(self.denoiser, self.adapter, self._adapter_params, self.fold)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return self._adapter_params + (list(self.head.parameters()) if self.head is not None else [])

    def rebind(self) -> None:
        """As :meth:`StudentView.rebind` (the head's parameters are read from the head each time)."""
        self._adapter_params = [self.denoiser.get_parameter(n) for n in self._adapter_names]


class TeacherView(nn.Module):
    """The frozen teacher: the base with adapters off, guided (CFG, or FLUX's embedded guidance)."""

    def __init__(self, denoiser: Denoiser):
        super().__init__()
        self.denoiser = denoiser

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: Condition, null: Condition | None, guidance: float) -> torch.Tensor:
        """The teacher's guided clean-sample prediction (B, C, h, w)."""
        use_adapter(self.denoiser.transformer, None)
        v = self.denoiser.velocity_fn(cond, null, guidance)(x, sigma)
        return clean_from_velocity(x, v, sigma)


@dataclass
class DistillModels:
    base: Denoiser  # frozen teacher weights carrying the adapters
    student: StudentView
    critic: CriticView | None  # None when neither DMD nor GAN is on
    features: CriticView  # block features for MMD: the critic if there is one, else the teacher
    teacher: TeacherView  # the base with adapters off (DMD's real score)

    def set_phase(self, phase: str) -> None:
        """``"generator"``: only the student trains; ``"critic"``: only the critic adapter and head."""
        if phase not in ("generator", "critic"):
            raise ValueError(f"unknown phase {phase!r}")
        for p in self.student.trainable_parameters():
            p.requires_grad_(phase == "generator")
        if self.critic is not None:
            for p in self.critic.trainable_parameters():
                p.requires_grad_(phase == "critic")

    def rebind(self) -> None:
        """Every view takes its trainable parameters again by name (after FSDP sharded the base)."""
        self.student.rebind()
        if self.critic is not None:
            self.critic.rebind()

    def parameters_held(self) -> int:
        """Distinct parameters in this process's memory (the shared base counted once; of a tensor
        sharded by FSDP, this process's shard)."""
        seen = {id(p): local_numel(p) for m in (self.base, self.student, self.critic) if m is not None for p in m.parameters()}
        return sum(seen.values())


@dataclass
class Roles:
    """How an iteration reaches each part. ``student`` trains in the generator update and ``critic``
    in a critic update (each DDP-wrapped on several processes); the others run frozen, unwrapped.
    Under FSDP every role is a route into the one sharded module (:mod:`swd.distill.fsdp`)."""

    student: Any  # x0_hat = student(x, sigma, cond), trained
    critic: Any  # CriticOutput = critic(x, sigma, cond, real=None), trained (None without a critic)
    student_samples: Any  # the frozen student making the critic's samples
    critic_frozen: Any  # the critic in the generator update (also ``logits_only``)
    features: Any  # MMD block features (``features_only``)
    teacher: Any  # x0 = teacher(x, sigma, cond, null, guidance)

    @classmethod
    def of(cls, models: DistillModels) -> "Roles":
        """The views themselves (one process, or tests)."""
        return cls(models.student, models.critic, models.student, models.critic, models.features, models.teacher)


def local_numel(t: torch.Tensor) -> int:
    """Elements this process holds of ``t`` (its shard when ``t`` is an FSDP-sharded DTensor)."""
    return t.to_local().numel() if isinstance(t, DTensor) else t.numel()


def parameter_names(module: nn.Module, params: list[nn.Parameter]) -> list[str]:
    """The names of ``params`` under ``module``, in the order of ``params``."""
    names = {id(p): n for n, p in module.named_parameters()}
    return [names[id(p)] for p in params]


DISTRIBUTED = ("ddp", "fsdp")


def check_distributed(cfg: DistillConfig) -> None:
    """``distill.distributed`` and what FSDP needs, before anything is loaded onto a device."""
    if cfg.distributed not in DISTRIBUTED:
        raise ValueError(f"unknown distill.distributed {cfg.distributed!r}; use 'ddp' or 'fsdp'")
    if cfg.ema_decay is not None:
        check_decay(cfg.ema_decay)
    if cfg.distributed != "fsdp":
        return
    if cfg.ema_decay is not None:
        raise ValueError("distill.ema_decay is not wired for distill.distributed=fsdp (the average would have to be "
                         "sharded like the adapter): use distill.distributed=ddp or leave ema_decay null")
    if cfg.student != "lora":
        raise ValueError("distill.distributed=fsdp shards the frozen base that the LoRA adapters share: it needs "
                         "distill.student=lora (a full student copy is for small models; use distill.distributed=ddp)")
    if cfg.mixed_precision == "fp16":
        raise ValueError("distill.distributed=fsdp runs with distill.mixed_precision 'no' or 'bf16': fp16 needs a "
                         "gradient scaler over the sharded gradients, which is not wired here")


def needs_critic(cfg: LossConfig) -> bool:
    return cfg.dmd_weight > 0 or cfg.gan_weight > 0


def guidance_of_losses(cfg: LossConfig) -> float | None:
    """The teacher's guidance the generator losses need (the unconditional embedding is made for
    it): ``dmd_guidance`` when DMD or the teacher regression is on, else ``self_guidance_scale`` when
    self guidance is on (it needs the null condition as well), else None."""
    teacher_guided = cfg.dmd_weight > 0 or cfg.teacher_regression_weight > 0
    if teacher_guided and cfg.dmd_guidance != 1.0:
        return cfg.dmd_guidance
    if cfg.self_guidance_weight > 0:
        return cfg.self_guidance_scale
    return cfg.dmd_guidance if teacher_guided else None


def lora_config(cfg: LoraConfig, default_targets=Denoiser.default_lora_targets) -> PeftLoraConfig:
    """peft config of the student / critic adapters; ``default_targets`` comes from the backbone adapter."""
    if cfg.rank < 1:
        raise ValueError(f"distill.lora.rank must be >= 1, got {cfg.rank}")
    targets = cfg.targets or default_targets
    targets = targets if isinstance(targets, str) else list(targets)  # a string is a regex for peft
    return PeftLoraConfig(r=cfg.rank, lora_alpha=cfg.alpha or cfg.rank, target_modules=targets, init_lora_weights=True)


def check_loss_weights(cfg: DistillConfig) -> None:
    loss = cfg.loss
    weights = {"mmd_weight": loss.mmd_weight, "dmd_weight": loss.dmd_weight, "gan_weight": loss.gan_weight,
               "teacher_regression_weight": loss.teacher_regression_weight, "real_regression_weight": loss.real_regression_weight}
    negative = [k for k, v in weights.items() if v < 0]
    if negative:
        raise ValueError(f"distill.loss.{negative[0]} must be >= 0")
    if loss.teacher_regression_steps < 1:
        raise ValueError(f"distill.loss.teacher_regression_steps must be >= 1 (1: the teacher's one-step prediction), "
                         f"got {loss.teacher_regression_steps}")
    if loss.self_guidance_weight < 0:
        raise ValueError("distill.loss.self_guidance_weight must be >= 0")
    if loss.self_guidance_weight > 0 and loss.self_guidance_scale == 1.0:
        raise ValueError("distill.loss.self_guidance_scale 1.0 is no guidance (the loss would be 0): use a scale above 1, "
                         "e.g. 2.0, or set self_guidance_weight=0")
    if loss.self_guidance_weight > 0 and cfg.student != "lora":
        raise ValueError("distill.loss.self_guidance_weight needs distill.student=lora (a full copy's null condition "
                         "is not wired); set it to 0 or use a LoRA student")
    if not any(v > 0 for v in weights.values()):
        raise ValueError("every generator loss weight is 0: set distill.loss.mmd_weight, dmd_weight, gan_weight, "
                         "teacher_regression_weight or real_regression_weight > 0")
    if needs_critic(loss) and cfg.critic.updates < 1:
        raise ValueError("DMD and GAN need a critic: distill.critic.updates must be >= 1")


def build_distill_models(teacher: Denoiser, cfg: DistillConfig) -> DistillModels:
    """Freeze the teacher and attach what the configured losses need, nothing more."""
    check_loss_weights(cfg)
    if cfg.student not in ("lora", "full"):
        raise ValueError(f"unknown distill.student {cfg.student!r}; use 'lora' or 'full'")
    check_distributed(cfg)
    check_fold_setting(cfg.fold_adapters)  # before any adapter is added
    fold_setting = cfg.fold_adapters if cfg.distributed == "ddp" else False  # FSDP swaps in gathered weights at each block: nothing to fold into
    n_blocks = len(teacher.blocks)
    block = n_blocks // 2 if cfg.critic.feature_block is None else cfg.critic.feature_block
    if not -n_blocks <= block < n_blocks:
        raise ValueError(f"distill.critic.feature_block {block} is out of range for a teacher with {n_blocks} blocks")
    teacher.requires_grad_(False)
    if cfg.student == "full":
        copy_ = copy.deepcopy(teacher)
        student = StudentView(copy_, None, False)  # a full copy has no adapter to fold
        for p in student.trainable_parameters():
            p.requires_grad_(True)
    else:
        teacher.transformer.add_adapter(lora_config(cfg.lora, teacher.default_lora_targets), adapter_name=STUDENT)
        student = StudentView(teacher, STUDENT, resolve_fold(fold_setting, teacher.transformer, STUDENT))
    critic = None
    if needs_critic(cfg.loss):
        with warnings.catch_warnings():  # peft warns that a second adapter is being added: that is the design
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            teacher.transformer.add_adapter(lora_config(cfg.lora, teacher.default_lora_targets), adapter_name=CRITIC)
        cfg_t = teacher.transformer.config
        head = GANHead(cfg_t.num_attention_heads * cfg_t.attention_head_dim, cfg.critic.head_layers) if cfg.loss.gan_weight > 0 else None
        critic = CriticView(teacher, CRITIC, head, block, resolve_fold(fold_setting, teacher.transformer, CRITIC))
    features = critic if critic is not None else CriticView(teacher, None, None, block, False)  # the teacher: no adapter to fold
    models = DistillModels(teacher, student, critic, features, TeacherView(teacher))
    models.set_phase("generator")
    return models

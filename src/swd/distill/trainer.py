"""``swd distill``: the SwD trainer, a thin loop on accelerate.

Per generator update (spec section 5): pick the stage (round-robin), build its inputs, run
``critic_updates`` critic updates (if DMD or GAN is on), then one student update. Checkpoints
hold the trainable weights (both adapters, head), both optimizers, RNG and the step (which is the
data position); resume continues exactly. The frozen base is not written into checkpoints.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..commands import load_reference
from ..config import Config, save_config
from ..generate import generate_scalewise
from ..schedule import ScaleSchedule
from ..train.common import (
    build_dataset,
    check_finite,
    check_resume_config,
    condition_values,
    latest_checkpoint,
    load_batch,
    read_state,
    save_checkpoint,
)
from ..viz import save_grid
from .cache import EncodedDataset, cached_condition, cached_model_space
from .checkpointing import enable_block_checkpointing
from .export import export_student
from .inputs import check_index_range, loss_grid, stage_inputs, stage_of, training_schedule
from .adapters import use_adapter
from .models import DistillModels, build_distill_models
from .step import BatchNoise, LossContext, critic_losses, critic_samples, critic_total, generator_losses, generator_total

RESUME_SECTIONS = ("model", "data", "schedule", "distill")
TRAINABLE_FILE = "trainable.safetensors"
SUMMARY_FILE = "train_summary.json"


def _named_trainable(view, prefix: str) -> dict[str, torch.nn.Parameter]:
    ids = {id(p) for p in view.trainable_parameters()}
    return {f"{prefix}.{n}": p for n, p in view.named_parameters() if id(p) in ids}


def trainable_parameters_by_name(models: DistillModels) -> dict[str, torch.nn.Parameter]:
    """Every trainable tensor by a stable name: student adapter (or copy), critic adapter, head."""
    named = _named_trainable(models.student, "student")
    if models.critic is not None:
        named.update(_named_trainable(models.critic, "critic"))
    return named


def trainable_state(models: DistillModels) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in trainable_parameters_by_name(models).items()}


def load_trainable_state(models: DistillModels, state: dict[str, torch.Tensor]) -> None:
    current = trainable_parameters_by_name(models)
    missing, unexpected = sorted(set(current) - set(state)), sorted(set(state) - set(current))
    if missing or unexpected:
        raise ValueError(f"checkpoint weights do not match this run's models (another distill config?): missing {missing[:5]}, unexpected {unexpected[:5]}")
    with torch.no_grad():
        for name, value in state.items():
            current[name].copy_(value)


def _register_state_hooks(accelerator: Accelerator, models: DistillModels) -> None:
    """Checkpoints hold only the trainable tensors (accelerate's documented save/load hooks)."""

    def save_hook(_models, weights, output_dir):
        if accelerator.is_main_process:
            save_file(trainable_state(models), str(Path(output_dir) / TRAINABLE_FILE))
        weights.clear()

    def load_hook(loaded_models, input_dir):
        path = Path(input_dir) / TRAINABLE_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: {input_dir} is not a swd distill checkpoint")
        load_trainable_state(models, load_file(str(path)))
        loaded_models.clear()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def _optimizer(params, lr: float, cfg) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, eps=cfg.adam_eps)


def distill(config: Config, resume: str = "auto") -> Path:
    """Train the student; returns the exported student directory (``output_dir/student``)."""
    cfg = config.distill
    out = Path(config.output_dir)
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, log_with="tensorboard", project_dir=str(out), cpu=config.device == "cpu")
    set_seed(config.seed)
    device = accelerator.device

    teacher_name = config.model.pretrained or cfg.teacher
    teacher, config.model = load_reference(teacher_name, config.model)
    schedule = training_schedule(ScaleSchedule(config.schedule.sizes, config.schedule.sigmas), cfg.mode)
    teacher.check_schedule(schedule)
    if config.model.kind == "diffusers":  # the data is read at the final size in pixels
        config.model.sample_size = list(teacher.pixel_size(schedule.final_size))
    grid = loss_grid(cfg.grid_steps, cfg.grid_shift)
    ranges = {k: check_index_range(f"{k}_indices", getattr(cfg, f"{k}_indices"), len(grid)) for k in ("dmd", "mmd", "critic")}
    if cfg.batch_size % accelerator.num_processes:
        raise ValueError(f"distill.batch_size {cfg.batch_size} is not divisible by the {accelerator.num_processes} processes")
    dataset = build_dataset(config.data, config.model)
    models = build_distill_models(teacher, cfg)
    trainable = models.student.trainable_parameters() + (models.critic.trainable_parameters() if models.critic is not None else [])
    for p in trainable:  # adapters and head train in fp32 even on a bf16 teacher: bf16 AdamW updates of 5e-6 round away
        p.data = p.data.float()
    if cfg.gradient_checkpointing:  # per block, each block recomputed under the adapter it ran with
        for transformer in {id(t): t for t in (models.base.transformer, models.student.denoiser.transformer)}.values():
            enable_block_checkpointing(transformer)
    models.base.to(device)
    cached = bool(config.data.cache_dir)
    if cached:
        manifest = {"teacher": teacher_reference(teacher_name), "model": vars(config.model)}
        dataset = EncodedDataset(dataset, models.base, schedule.sizes, config.data.cache_dir, manifest)

    models.set_phase("generator")
    student_params = models.student.trainable_parameters()
    student = accelerator.prepare_model(models.student)
    opt_g = accelerator.prepare_optimizer(_optimizer(student_params, cfg.lr, cfg))
    critic, opt_c, critic_params = None, None, []
    if models.critic is not None:
        models.set_phase("critic")
        critic_params = models.critic.trainable_parameters()
        critic = accelerator.prepare_model(models.critic)
        opt_c = accelerator.prepare_optimizer(_optimizer(critic_params, cfg.critic_lr, cfg))
    _register_state_hooks(accelerator, models)

    start, train_seconds, skipped = 0, 0.0, 0  # skipped: steps dropped for a NaN/Inf loss (distill.skip_nonfinite)
    checkpoint = None if resume == "never" else (latest_checkpoint(out) if resume == "auto" else Path(resume))
    if checkpoint is not None:
        state = read_state(checkpoint)
        check_resume_config(state["config"], config, RESUME_SECTIONS)
        accelerator.load_state(str(checkpoint))
        start, train_seconds, skipped = state["step"], state.get("train_seconds", 0.0), state.get("skipped_steps", 0)
        accelerator.print(f"resumed from {checkpoint} at step {start}")
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(config, out / "config.yaml")
    accelerator.init_trackers("distill")

    world, rank = accelerator.num_processes, accelerator.process_index
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc=f"distill ({cfg.mode})", disable=not accelerator.is_main_process)
    done = start
    last_saved = start
    for step in bar:
        if _out_of_time(cfg.max_minutes, train_seconds):
            accelerator.print(f"distill.max_minutes={cfg.max_minutes} reached after {done} steps")
            break
        t0 = time.perf_counter()
        stage = stage_of(step, schedule.num_steps)
        noise = BatchNoise(config.seed, step, cfg.batch_size, rank, world, device)
        batch = load_batch(dataset, step, cfg.batch_size, config.seed, rank, world)
        values = condition_values(batch)
        if isinstance(values, torch.Tensor):
            values = values.to(device)
        with torch.no_grad():
            if cached:  # encodings from data.cache_dir: no image decoding, no VAE or text encoder
                images, cond, to_model_space = None, cached_condition(batch, device), cached_model_space(batch, device)
            else:
                images, cond, to_model_space = batch["image"].to(device), models.base.condition(values), models.base.to_model_space
            null = models.base.null_condition(len(values)) if cfg.dmd_weight > 0 and models.base.needs_null_condition(cfg.dmd_guidance) else None
            eps = noise.randn(models.base.channels, *schedule.sizes[stage])
            inputs = stage_inputs(images, schedule, stage, eps, config.schedule.upsample_mode, to_model_space)
        ctx = LossContext(inputs, cond, null, values if models.student.owns_conditioner else cond, grid.to(device), ranges)

        try:
            logs = iteration(accelerator, models, student, critic, (opt_g, opt_c), (student_params, critic_params), ctx, noise, cfg, step)
        except FloatingPointError as err:  # every process raises together (see _update)
            if skipped >= cfg.skip_nonfinite:
                raise
            skipped += 1
            for opt in (opt_g, opt_c):
                if opt is not None:
                    opt.zero_grad(set_to_none=True)
            accelerator.print(f"skipped step {step + 1} ({skipped} of distill.skip_nonfinite={cfg.skip_nonfinite}): {err}")
            accelerator.log({"skipped_steps": skipped}, step=step + 1)
            logs = {}
        train_seconds += time.perf_counter() - t0
        done = step + 1

        if logs and (done % cfg.log_every == 0 or done == cfg.steps):
            values_ = {k: accelerator.reduce(v.detach(), "mean").item() for k, v in logs.items()}
            scalars = {f"loss/{k}": v for k, v in values_.items()}
            scalars.update({f"loss/{k}/stage_{stage}": v for k, v in values_.items()})
            scalars["seconds_per_iteration"] = time.perf_counter() - t0
            accelerator.log(scalars, step=done)
            bar.set_postfix({k: f"{v:.4f}" for k, v in values_.items()}, stage=stage)
        out_of_time = _out_of_time(cfg.max_minutes, train_seconds)
        if done % cfg.checkpoint_every == 0 or done == cfg.steps or out_of_time:
            save_checkpoint(accelerator, out, done, config, cfg.keep_checkpoints, {"train_seconds": train_seconds, "skipped_steps": skipped})
            last_saved = done
        if accelerator.is_main_process and cfg.sample_every and (done % cfg.sample_every == 0 or done == cfg.steps or out_of_time):
            preview(models, schedule, config, out / "samples" / f"step_{done:07d}.png")
    if done > last_saved:
        save_checkpoint(accelerator, out, done, config, cfg.keep_checkpoints, {"train_seconds": train_seconds, "skipped_steps": skipped})
    directory = out / "student"
    if accelerator.is_main_process:
        directory = export_student(models, config, schedule, teacher_reference(teacher_name), out, done)
        summary = {"steps": done, "train_seconds": train_seconds, "seconds_per_iteration": train_seconds / max(done, 1), "processes": world,
                   "skipped_steps": skipped}
        (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=1))
    accelerator.wait_for_everyone()
    accelerator.end_training()  # last: it also ends the process group
    return directory


def iteration(accelerator: Accelerator, models: DistillModels, student, critic, optimizers: tuple, params: tuple, ctx: LossContext, noise: BatchNoise, cfg, step: int) -> dict[str, torch.Tensor]:
    """One generator update preceded by ``cfg.critic_updates`` critic updates (if there is a critic).

    ``student`` / ``critic`` are the (possibly DDP-wrapped) views; returns the last losses.
    """
    opt_g, opt_c = optimizers
    student_params, critic_params = params
    stage = ctx.inputs.stage
    logs: dict[str, torch.Tensor] = {}
    if critic is not None:
        models.set_phase("critic")
        with accelerator.autocast():  # the student is frozen through the critic updates: their samples in one forward
            samples = critic_samples(models.student, ctx, noise, cfg.critic_updates)
        for x0_hat in samples:
            with accelerator.autocast():
                losses = critic_losses(critic, x0_hat, ctx, noise, cfg)
            _update(accelerator, losses, critic_total(losses, cfg), "critic_total", critic_params, opt_c, cfg.grad_clip, step, stage)
        logs.update(losses)
    models.set_phase("generator")
    with accelerator.autocast():
        losses = generator_losses(student, models.base, models.critic, models.features, ctx, noise, cfg)
    _update(accelerator, losses, generator_total(losses, cfg), "generator_total", student_params, opt_g, cfg.grad_clip, step, stage)
    logs.update(losses)
    return logs


def _update(accelerator: Accelerator, losses: dict, total: torch.Tensor, total_name: str, params: list, optimizer, grad_clip: float, step: int, stage: int) -> None:
    """Backward, clip, step, zero; a NaN/Inf loss raises (naming it) before any weight moves.

    The verdict is shared: if any process sees a non-finite loss, every process raises, so no
    process waits in a gradient all-reduce that the others never join.
    """
    named = {**losses, total_name: total}
    local_bad = torch.stack([~torch.isfinite(v.detach()).all() for v in named.values()]).any()
    if accelerator.reduce(local_bad.float().reshape(1), "sum").item() > 0:
        check_finite(named, step, stage)  # raises here, naming the loss, if this process saw it
        raise FloatingPointError(f"a loss is NaN/Inf on another process at step {step}, stage {stage}; the last complete checkpoint is kept")
    accelerator.backward(total)
    if grad_clip > 0:
        accelerator.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def teacher_reference(name: str) -> str:
    """How an exported student names its teacher: a built-in name or a hub id stays as it is
    (valid in any installation), a directory becomes an absolute path."""
    from ..commands import BUILTIN_MODELS

    path = Path(name)
    return str(path.resolve()) if name not in BUILTIN_MODELS and path.exists() else name


def _out_of_time(max_minutes: float | None, train_seconds: float) -> bool:
    return max_minutes is not None and train_seconds >= 60 * max_minutes


@torch.no_grad()
def preview(models: DistillModels, schedule: ScaleSchedule, config: Config, path: Path) -> Path:
    """A 10 x 10 grid from the current student on its schedule, to watch progress."""
    student = models.student.denoiser
    use_adapter(student.transformer, models.student.adapter)
    was_training = student.training
    student.eval()
    k = getattr(student.conditioner, "num_classes", None)
    values = torch.arange(100) % k if k else ["a photo"] * 16
    images = student.decode(generate_scalewise(student, values, schedule, torch.Generator().manual_seed(0), 1.0, config.schedule.upsample_mode))
    student.train(was_training)
    return save_grid(images, path, nrow=10 if k else 4)

"""``swd distill``: the SwD trainer, a thin loop on accelerate.

Setup (:func:`load_teacher`, the models, optimizers, resume), then per generator update (spec
section 5): the batch becomes its stage's loss context (:func:`swd.distill.stage.build_stage`,
stages round-robin), and one iteration runs ``critic.updates`` critic updates (if DMD or GAN is
on) and one student update (:func:`swd.distill.iteration.iteration`). Checkpoints hold the
trainable weights (both adapters, head), both optimizers, RNG and the step (which is the data
position); resume continues exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from tqdm.auto import tqdm

from ..config import Config, LossConfig, save_config
from ..generate import preview_values
from ..models import Denoiser
from ..registry import load_reference, teacher_reference
from ..schedule import ScaleSchedule
from ..train.batches import build_dataset, load_batch
from ..train.checkpoints import check_resume_config, latest_checkpoint, read_state, save_checkpoint
from ..viz import save_grid
from .cache import EncodedDataset
from .export import export_student
from .fsdp import is_sharded, prepare_fsdp
from .grad_checkpointing import enable_block_checkpointing
from .iteration import adamw, check_backward_simulation, iteration, simulate_stage
from .noise import BatchNoise, NoiseLevels
from .stage import build_stage, stage_of, training_schedule
from .ema import StudentEMA
from .state import load_trainable_state, register_state_hooks, trainable_parameters_by_name, trainable_state
from .views import DistillModels, Roles, build_distill_models, guidance_of_losses

RESUME_SECTIONS = ("model", "data", "schedule", "distill")
SUMMARY_FILE = "train_summary.json"


def load_teacher(name: str, config: Config, schedule: ScaleSchedule) -> tuple[Denoiser, Config, ScaleSchedule]:
    """The teacher ``name``, the config with the teacher's own model section (a pipeline teacher's
    data is read at the final size in pixels), and the schedule the student trains on (``distill.mode``)."""
    teacher, model_cfg = load_reference(name, config.model)
    trained = training_schedule(schedule, config.distill.mode)
    teacher.check_schedule(trained)
    if model_cfg.kind == "diffusers":
        model_cfg = dataclasses.replace(model_cfg, sample_size=list(teacher.pixel_size(trained.final_size)))
    return teacher, dataclasses.replace(config, model=model_cfg), trained


def distill(config: Config, resume: str = "auto") -> Path:
    """Train the student; returns the exported student directory (``output_dir/student``)."""
    cfg = config.distill
    out = Path(config.output_dir)
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, log_with="tensorboard", project_dir=str(out), cpu=config.device == "cpu")
    set_seed(config.seed)
    device, world, rank = accelerator.device, accelerator.num_processes, accelerator.process_index
    teacher_name = config.model.pretrained or cfg.teacher
    teacher, config, schedule = load_teacher(teacher_name, config, ScaleSchedule.from_config(config.schedule))
    levels = NoiseLevels.from_config(cfg.noise)
    check_mmd_stages(cfg.loss, schedule.num_steps)
    check_backward_simulation(cfg.backward_simulation)
    if cfg.batch_size % world:
        raise ValueError(f"distill.batch_size {cfg.batch_size} is not divisible by the {world} processes")
    dataset = build_dataset(config.data, config.model)
    models = build_distill_models(teacher, cfg)
    roles, optimizers, params, ema = prepare(accelerator, models, cfg)
    sharded = is_sharded(models)
    if config.data.cache_dir:
        manifest = {"teacher": teacher_reference(teacher_name), "model": vars(config.model)}
        dataset = EncodedDataset(dataset, models.base, schedule.sizes, config.data.cache_dir, manifest)
    start, train_seconds, skipped = resume_run(accelerator, config, out, resume)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(config, out / "config.yaml")
    accelerator.init_trackers("distill")
    null_guidance = guidance_of_losses(cfg.loss)

    def checkpoint(step: int) -> None:
        save_checkpoint(accelerator, out, step, config, cfg.keep_checkpoints, {"train_seconds": train_seconds, "skipped_steps": skipped})

    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc=f"distill ({cfg.mode})", disable=not accelerator.is_main_process)
    done = last_saved = start
    for step in bar:
        if out_of_time(cfg.max_minutes, train_seconds):
            accelerator.print(f"distill.max_minutes={cfg.max_minutes} reached after {done} steps")
            break
        t0 = time.perf_counter()
        stage = stage_of(step, schedule.num_steps)
        noise = BatchNoise(config.seed, step, cfg.batch_size, rank, world, device)
        batch = load_batch(dataset, step, cfg.batch_size, config.seed, rank, world)
        ctx = build_stage(models.base, batch, schedule, stage, noise, levels, config.schedule.upsample_mode, null_guidance,
                          models.student.owns_conditioner)
        ctx = simulate_stage(accelerator, models, roles, ctx, schedule, noise, cfg, config.schedule.upsample_mode)
        try:
            logs = iteration(accelerator, models, roles, optimizers, params, ctx, noise, cfg, step)
        except FloatingPointError as err:  # every process raises together (see iteration.update)
            if skipped >= cfg.skip_nonfinite:
                raise
            skipped += 1
            skip_step(accelerator, optimizers, err, step, skipped, cfg.skip_nonfinite)
            logs = {}
        if ema is not None and logs:
            ema.update()
        train_seconds += time.perf_counter() - t0
        done = step + 1
        if logs and (done % cfg.log_every == 0 or done == cfg.steps):
            log_losses(accelerator, bar, logs, done, stage, time.perf_counter() - t0)
        stop = out_of_time(cfg.max_minutes, train_seconds)
        if done % cfg.checkpoint_every == 0 or done == cfg.steps or stop:
            checkpoint(done)
            last_saved = done
        if cfg.sample_every and (done % cfg.sample_every == 0 or done == cfg.steps or stop) and (sharded or accelerator.is_main_process):
            # sharded (FSDP): every process runs the student's forwards together, the main one writes the grid
            student = roles.student_samples if sharded else models.student
            with ema.applied() if ema is not None else contextlib.nullcontext():
                images, nrow = preview(student, models.student.denoiser, schedule, config.schedule.upsample_mode, getattr(dataset, "captions", None))
            if accelerator.is_main_process:
                save_grid(images, out / "samples" / f"step_{done:07d}.png", nrow=nrow)
    if done > last_saved:
        checkpoint(done)
    directory = out / "student"
    held = models.parameters_held()  # on the main process; the base's shard under FSDP
    if sharded:  # the student exists only in shards: its weights gathered onto a fresh, whole copy
        state = trainable_state(models)  # on every process
        models = whole_models(teacher_name, config, state) if accelerator.is_main_process else None
    if accelerator.is_main_process:
        with ema.applied() if ema is not None else contextlib.nullcontext():  # the export is the average
            directory = export_student(models, config, schedule, teacher_reference(teacher_name), out, done)
        summary = {"steps": done, "train_seconds": train_seconds, "seconds_per_iteration": train_seconds / max(done, 1),
                   "processes": world, "skipped_steps": skipped, "distributed": cfg.distributed, "parameters_held": held}
        (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=1))
    accelerator.wait_for_everyone()
    accelerator.end_training()  # last: it also ends the process group
    return directory


def prepare(accelerator: Accelerator, models: DistillModels, cfg) -> tuple[Roles, tuple, tuple, StudentEMA | None]:
    """Trainable parts in fp32, per-block checkpointing if asked; then each view wrapped (DDP) with
    its own optimizer, or, with ``distill.distributed=fsdp``, every view a role of one sharded module
    (:func:`swd.distill.fsdp.prepare_fsdp`). Returns (roles, (opt_g, opt_c), (student_params, critic_params),
    the student's average or None)."""
    if accelerator.distributed_type == DistributedType.FSDP:  # accelerate would shard each view, and the base with it, on its own
        raise ValueError("launched with accelerate's FSDP options: launch without them (plain multi-process) and set "
                         "distill.distributed=fsdp, which shards the base the student, critic and teacher share once")
    train_in_fp32(models)
    if cfg.gradient_checkpointing:  # per block, each block recomputed under the adapter it ran with
        for transformer in {id(t): t for t in (models.base.transformer, models.student.denoiser.transformer)}.values():
            enable_block_checkpointing(transformer)
    if cfg.distributed == "fsdp":
        return (*prepare_fsdp(accelerator, models, cfg), None)  # check_distributed refuses an average under FSDP
    models.base.to(accelerator.device)
    models.set_phase("generator")
    student_params = models.student.trainable_parameters()
    student = accelerator.prepare_model(models.student)
    opt_g = accelerator.prepare_optimizer(adamw(student_params, cfg.optim.lr, cfg.optim))
    critic, opt_c, critic_params = None, None, []
    if models.critic is not None:
        models.set_phase("critic")
        critic_params = models.critic.trainable_parameters()
        critic = accelerator.prepare_model(models.critic)
        opt_c = accelerator.prepare_optimizer(adamw(critic_params, cfg.optim.critic_lr, cfg.optim))
    ema = None
    if cfg.ema_decay is not None:
        ema = StudentEMA({k: p for k, p in trainable_parameters_by_name(models).items() if k.startswith("student.")}, cfg.ema_decay)
    register_state_hooks(accelerator, models, ema=ema)
    roles = Roles(student, critic, models.student, models.critic, models.features, models.teacher)
    return roles, (opt_g, opt_c), (student_params, critic_params), ema


def train_in_fp32(models: DistillModels) -> None:
    """Adapters and head train in fp32 even on a bf16 teacher: bf16 AdamW updates of 5e-6 round away."""
    trainable = models.student.trainable_parameters() + (models.critic.trainable_parameters() if models.critic is not None else [])
    for p in trainable:
        p.data = p.data.float()


def whole_models(teacher_name: str, config: Config, state: dict[str, torch.Tensor]) -> DistillModels:
    """The teacher loaded again with the adapters and head of ``state`` (:func:`swd.distill.state.trainable_state`),
    unsharded, on the CPU: what the export reads after FSDP training."""
    teacher, _ = load_reference(teacher_name, config.model)
    models = build_distill_models(teacher, config.distill)
    train_in_fp32(models)
    load_trainable_state(models, state)
    return models


def resume_run(accelerator: Accelerator, config: Config, out: Path, resume: str) -> tuple[int, float, int]:
    """Load the checkpoint ``resume`` names ("auto": the latest, "never": none); returns the step,
    the training seconds and the skipped steps so far."""
    checkpoint = None if resume == "never" else (latest_checkpoint(out) if resume == "auto" else Path(resume))
    if checkpoint is None:
        return 0, 0.0, 0
    state = read_state(checkpoint)
    check_resume_config(state["config"], config, RESUME_SECTIONS)
    accelerator.load_state(str(checkpoint))
    accelerator.print(f"resumed from {checkpoint} at step {state['step']}")
    return state["step"], state.get("train_seconds", 0.0), state.get("skipped_steps", 0)


def skip_step(accelerator: Accelerator, optimizers: tuple, err: Exception, step: int, skipped: int, allowed: int) -> None:
    """Drop a step whose loss was NaN/Inf (``distill.skip_nonfinite``): no gradient is kept."""
    for opt in optimizers:
        if opt is not None:
            opt.zero_grad(set_to_none=True)
    accelerator.print(f"skipped step {step + 1} ({skipped} of distill.skip_nonfinite={allowed}): {err}")
    accelerator.log({"skipped_steps": skipped}, step=step + 1)


def log_losses(accelerator: Accelerator, bar, logs: dict[str, torch.Tensor], done: int, stage: int, seconds: float) -> None:
    """Losses averaged over processes, to tensorboard (overall and per stage) and the progress bar."""
    values = {k: accelerator.reduce(v.detach(), "mean").item() for k, v in logs.items()}
    scalars = {f"loss/{k}": v for k, v in values.items()}
    scalars.update({f"loss/{k}/stage_{stage}": v for k, v in values.items()})
    scalars["seconds_per_iteration"] = seconds
    accelerator.log(scalars, step=done)
    bar.set_postfix({k: f"{v:.4f}" for k, v in values.items()}, stage=stage)


def check_stage_list(key: str, stages, num_stages: int) -> None:
    """Refuse a ``distill.loss.<key>`` stage list with an index outside the schedule's stages."""
    bad = [s for s in stages or [] if not (isinstance(s, int) and 0 <= s < num_stages)]
    if bad:
        raise ValueError(f"distill.loss.{key} {stages}: stage {bad[0]} is not one of the schedule's "
                         f"stages 0..{num_stages - 1}; list 0-based stage indices, or leave it null for every stage")


def check_mmd_stages(loss: LossConfig, num_stages: int) -> None:
    check_stage_list("self_guidance_stages", loss.self_guidance_stages, num_stages)
    check_stage_list("teacher_regression_stages", loss.teacher_regression_stages, num_stages)
    if loss.mmd_stages is None:
        return
    check_stage_list("mmd_stages", loss.mmd_stages, num_stages)
    left_out = sorted(set(range(num_stages)) - set(loss.mmd_stages))
    if left_out and loss.dmd_weight == 0 and loss.gan_weight == 0 and loss.teacher_regression_weight == 0 and loss.real_regression_weight == 0:
        raise ValueError(f"distill.loss.mmd_stages {loss.mmd_stages} leaves out stage {left_out[0]}, and MMD is the only "
                         "loss: that stage would have nothing to train on; add it, or turn on DMD, GAN or a regression")


def out_of_time(max_minutes: float | None, train_seconds: float) -> bool:
    return max_minutes is not None and train_seconds >= 60 * max_minutes


def preview(student, model: Denoiser, schedule: ScaleSchedule, upsample_mode: str, captions) -> tuple[torch.Tensor, int]:
    """A grid (images, images per row) from the current ``student`` (its view, or its FSDP role) on
    its schedule, to watch progress; ``model``, the student's denoiser, says what it is conditioned on."""
    values, nrow = preview_values(model, captions)
    return student.sample(values, schedule, torch.Generator().manual_seed(0), upsample_mode), nrow

"""``swd pretrain``: flow-matching training of the built-in teacher.

Batches rotate over every size of the scale schedule, so the teacher is also good at the low
resolutions that distribution matching will query. EMA weights, accelerate checkpoints with
exact resume (model, optimizer, LR schedule, EMA, RNG, step = data position), tensorboard.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from ..config import Config, save_config
from ..generate import generate_teacher, preview_values
from ..models import Denoiser, build_denoiser, save_denoiser
from ..schedule import ScaleSchedule, add_noise, downsample
from ..viz import save_grid
from .batches import build_dataset, condition_values, load_batch
from .checkpoints import check_finite, check_resume_config, latest_checkpoint, read_state, save_checkpoint
from .flow_matching import flow_matching_loss, sample_logit_normal_sigmas

RESUME_SECTIONS = ("model", "data", "schedule", "pretrain")


def training_sizes(schedule: ScaleSchedule, multiscale: bool) -> list[tuple[int, int]]:
    """Distinct sizes the teacher trains on, smallest first (only the final one if not multiscale)."""
    return sorted(set(schedule.sizes)) if multiscale else [schedule.final_size]


def export_ema(model: Denoiser, ema: EMAModel, directory: Path, config: Config) -> Path:
    """Save the EMA weights as a model directory, then put the training weights back."""
    params = [p for p in model.parameters() if p.requires_grad]
    ema.store(params)
    ema.copy_to(params)
    save_denoiser(model, directory, config.model)
    ema.restore(params)
    save_config(config, directory / "config.yaml")
    return directory


def pretrain(config: Config, resume: str = "auto") -> Path:
    """Train; returns the exported EMA model directory (``output_dir/model``).

    ``resume``: "auto" (continue from the latest complete checkpoint if there is one),
    "never", or a checkpoint directory.
    """
    cfg = config.pretrain
    out = Path(config.output_dir)
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision,
        log_with="tensorboard",
        project_dir=str(out),
        cpu=config.device == "cpu",
    )
    set_seed(config.seed)
    schedule = ScaleSchedule.from_config(config.schedule)
    model = build_denoiser(config.model)
    model.check_schedule(schedule)
    dataset = build_dataset(config.data, config.model)
    sizes = training_sizes(schedule, cfg.multiscale)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    lr_scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.steps)
    ema = EMAModel(params, decay=cfg.ema_decay)
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    accelerator.register_for_checkpointing(ema)

    start = 0
    checkpoint = None if resume == "never" else (latest_checkpoint(out) if resume == "auto" else Path(resume))
    if checkpoint is not None:
        state = read_state(checkpoint)
        check_resume_config(state["config"], config, RESUME_SECTIONS)
        accelerator.load_state(str(checkpoint))
        start = state["step"]
        accelerator.print(f"resumed from {checkpoint} at step {start}")
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(config, out / "config.yaml")
    accelerator.init_trackers("pretrain")
    ema.to(accelerator.device)

    unwrapped: Denoiser = accelerator.unwrap_model(model)
    gen = torch.Generator().manual_seed(config.seed * 7919 + accelerator.process_index)
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="pretrain", disable=not accelerator.is_main_process)
    last_saved = start
    for step in bar:
        gen.manual_seed(config.seed * 7919 + 104_729 * step + accelerator.process_index)
        size = sizes[step % len(sizes)]
        batch = load_batch(dataset, step, cfg.batch_size, config.seed, accelerator.process_index, accelerator.num_processes)
        x0 = downsample(batch["image"], size).to(accelerator.device)  # (B, C, h, w) area-downscaled target
        values = condition_values(batch)
        drop = torch.rand(len(x0), generator=gen) < cfg.cond_drop_prob
        values = unwrapped.conditioner.drop(values, drop)
        if isinstance(values, torch.Tensor):
            values = values.to(accelerator.device)
        sigma = sample_logit_normal_sigmas(len(x0), gen, cfg.logit_mean, cfg.logit_std).to(accelerator.device)
        eps = torch.randn(x0.shape, generator=gen).to(accelerator.device)

        t0 = time.perf_counter()
        with accelerator.autocast():
            v = model(add_noise(x0, eps, sigma), sigma, values)
        loss = flow_matching_loss(v, x0, eps).mean()
        check_finite({"flow_matching": loss}, step)
        accelerator.backward(loss)
        if accelerator.sync_gradients and cfg.grad_clip > 0:
            accelerator.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        ema.step(params)
        done = step + 1

        if done % cfg.log_every == 0 or done == cfg.steps:
            loss_value = accelerator.reduce(loss.detach(), "mean").item()
            size_key = f"{size[0]}x{size[1]}"
            accelerator.log(
                {"loss": loss_value, f"loss/{size_key}": loss_value, "lr": lr_scheduler.get_last_lr()[0], "seconds_per_step": time.perf_counter() - t0},
                step=done,
            )
            bar.set_postfix(loss=f"{loss_value:.4f}", size=size_key)
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            save_checkpoint(accelerator, out, done, config, cfg.keep_checkpoints)
            last_saved = done
            if accelerator.is_main_process:
                export_ema(unwrapped, ema, out / "model", config)
        if accelerator.is_main_process and cfg.sample_every and (done % cfg.sample_every == 0 or done == cfg.steps):
            _preview(unwrapped, ema, config, schedule, getattr(dataset, "captions", None), out / "samples" / f"step_{done:07d}.png")
    accelerator.end_training()
    if last_saved != cfg.steps and accelerator.is_main_process and start < cfg.steps:
        export_ema(unwrapped, ema, out / "model", config)
    return out / "model"


@torch.no_grad()
def _preview(model: Denoiser, ema: EMAModel, config: Config, schedule: ScaleSchedule, captions, path: Path) -> None:
    """A grid from the EMA weights, so progress can be watched."""
    params = [p for p in model.parameters() if p.requires_grad]
    ema.store(params)
    ema.copy_to(params)
    was_training = model.training
    model.eval()
    values, nrow = preview_values(model, captions)
    t = config.teacher
    images = generate_teacher(model, values, schedule.final_size, torch.Generator().manual_seed(0), t.steps, t.shift, t.guidance)
    ema.restore(params)
    model.train(was_training)
    save_grid(images, path, nrow=nrow)  # one column per class

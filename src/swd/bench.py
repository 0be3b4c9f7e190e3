"""``swd bench``: sampling and training speed measured side by side in one run.

Sampling: SwD n steps, full resolution n steps, full resolution n/2 steps and the guided teacher,
interleaved rounds, median. Training: one distillation iteration (critic updates + generator
update) for the full loss and MMD only, scale-wise and full resolution, rotating over the stages.
Plus the peak memory of a full-loss step and the parameters held (one base + adapters + head).

The ideal sampling ratio comes from token counts: a stage at L_i tokens costs about
``a L_i + b L_i^2`` per block (linear layers ~ 24 L d^2 FLOPs, attention scores and values
~ 4 L^2 d, with d the width and L including the condition tokens). Ignoring the attention term the
ratio SwD / full resolution is ``sum_i L_i / (n L_final)``.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import psutil
import torch
from accelerate import Accelerator
from matplotlib.figure import Figure

from .config import Config, save_config
from .distill.iteration import check_backward_simulation, iteration, simulate_stage
from .distill.noise import BatchNoise, NoiseLevels
from .distill.stage import build_stage, stage_of
from .distill.trainer import check_mmd_stages, load_teacher, prepare
from .distill.views import build_distill_models, guidance_of_losses
from .generate import check_compile_backend, compile_for_sampling, generate_scalewise, generate_teacher, network_evaluations
from .registry import resolve_device
from .schedule import ScaleSchedule
from .timing import median, synchronize, time_interleaved
from .train.batches import build_dataset, condition_values, load_batch


def ideal_token_ratio(scalewise: ScaleSchedule, patch_size: int) -> float:
    """``sum_i L_i / (n L_final)``: SwD's cost relative to n full-resolution steps, linear layers only."""
    tokens = scalewise.tokens(patch_size)
    return sum(tokens) / (len(tokens) * tokens[-1])


def ideal_flops_ratio(scalewise: ScaleSchedule, patch_size: int, width: int, condition_tokens: int) -> float:
    """The same ratio with the attention term: per block ``24 L d^2 + 4 L^2 d``, L with the condition tokens."""
    def cost(length: int) -> float:
        length += condition_tokens
        return 24 * length * width**2 + 4 * length**2 * width

    tokens = scalewise.tokens(patch_size)
    return sum(cost(t) for t in tokens) / (len(tokens) * cost(tokens[-1]))


def half_schedule(schedule: ScaleSchedule) -> ScaleSchedule:
    """Full resolution with every other noise level: the n/2-step baseline."""
    sigmas = list(schedule.sigmas[:-1])[::2] + [0.0]
    return ScaleSchedule.constant(schedule.final_size, sigmas)


class PeakMemory:
    """Memory a block adds at its peak: CUDA allocator statistics, or on CPU the growth of the
    process RSS over its value at entry, polled every 2 ms (approximate)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_bytes = 0
        self._stop = threading.Event()

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            synchronize(self.device)
            self.start_bytes = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        process = psutil.Process()

        def poll():
            while not self._stop.is_set():
                self.peak_bytes = max(self.peak_bytes, process.memory_info().rss)
                time.sleep(0.002)

        self.start_bytes = process.memory_info().rss
        self.peak_bytes = self.start_bytes
        self._thread = threading.Thread(target=poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()

    @property
    def added_bytes(self) -> int:
        return self.peak_bytes - self.start_bytes


@dataclass
class TrainingBench:
    """One distillation iteration of a given loss set and mode, callable repeatedly."""

    name: str
    run: Callable[[], None]
    params_held: int
    folds: bool = False  # whether the student's adapter runs folded (distill.fold_adapters)


def training_workload(name: str, teacher: str, config: Config, schedule: ScaleSchedule, dataset, mode: str, mmd_only: bool,
                      batch_size: int, device: torch.device) -> TrainingBench:
    """The trainer's setup and iteration on a fresh copy of ``teacher`` (``distill.*`` settings,
    ``mode`` "scalewise" or "fullres", MMD alone if ``mmd_only``); each call of ``run`` is one
    iteration at the next step's stage and batch."""
    cfg = config.distill
    # MMD alone trains every stage (as configs/distill_swd_mmd4.yaml): a config that leaves MMD out of
    # some stages (distill.loss.mmd_stages) relies on DMD and GAN there, which this workload turns off
    loss = dataclasses.replace(cfg.loss, dmd_weight=0.0, gan_weight=0.0, teacher_regression_weight=0.0, real_regression_weight=0.0,
                               self_guidance_weight=0.0, mmd_stages=None) if mmd_only else cfg.loss
    cfg = dataclasses.replace(cfg, mode=mode, loss=loss)
    check_mmd_stages(cfg.loss, schedule.num_steps)
    check_backward_simulation(cfg.backward_simulation)
    base, run_config, trained = load_teacher(teacher, dataclasses.replace(config, distill=cfg), schedule)
    models = build_distill_models(base, cfg)
    models.student.denoiser.to(device)
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=device.type == "cpu")
    roles, optimizers, params, _ = prepare(accelerator, models, cfg)
    levels = NoiseLevels.from_config(cfg.noise)
    null_guidance = guidance_of_losses(loss)
    counter = {"step": 0}

    def run() -> None:
        step = counter["step"]
        counter["step"] += 1
        noise = BatchNoise(config.seed, step, batch_size, 0, 1, device)
        batch = load_batch(dataset, step, batch_size, config.seed)
        ctx = build_stage(models.base, batch, trained, stage_of(step, trained.num_steps), noise, levels,
                          run_config.schedule.upsample_mode, null_guidance, models.student.owns_conditioner)
        ctx = simulate_stage(accelerator, models, roles, ctx, trained, noise, cfg, run_config.schedule.upsample_mode)
        iteration(accelerator, models, roles, optimizers, params, ctx, noise, cfg, step)

    return TrainingBench(name, run, models.parameters_held(), models.student.fold)


def run_bench(config: Config) -> dict:
    """Measure, print and write ``bench.json``, ``bench.md`` and ``bench.png`` to ``output_dir``.

    The backbone is ``checkpoint`` (default ``model.pretrained``, then ``distill.teacher``): a
    built-in or swd model directory, or a diffusers SD3 / FLUX pipeline.
    """
    cfg = config.bench
    check_compile_backend(cfg.compile)
    if cfg.compile is not None and cfg.warmup < 1:
        raise ValueError("bench.compile needs bench.warmup >= 1: the warmup round compiles each size, outside the timed rounds")
    device = resolve_device(config.device)
    name = config.checkpoint or config.model.pretrained or config.distill.teacher
    schedule = ScaleSchedule.from_config(config.schedule)
    model, run_config, _ = load_teacher(name, config, schedule)
    model = compile_for_sampling(model.to(device).eval(), cfg.compile)
    n = schedule.num_steps
    fullres = ScaleSchedule.constant(schedule.final_size, schedule.sigmas)
    half = half_schedule(schedule)
    dataset = build_dataset(run_config.data, run_config.model)  # loaded before the memory measurement
    values = condition_values(load_batch(dataset, 0, cfg.batch_size, config.seed))
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    sampling = {
        f"swd-{n}": (lambda: generate_scalewise(model, values, schedule, gen(), 1.0), n, 1.0),
        f"fullres-{n}": (lambda: generate_scalewise(model, values, fullres, gen(), 1.0), n, 1.0),
        f"fullres-{half.num_steps}": (lambda: generate_scalewise(model, values, half, gen(), 1.0), half.num_steps, 1.0),
        f"teacher-{config.teacher.steps}": (
            lambda: generate_teacher(model, values, schedule.final_size, gen(), config.teacher.steps, config.teacher.shift, config.teacher.guidance),
            config.teacher.steps,
            config.teacher.guidance,
        ),
    }
    with torch.inference_mode():
        sample_times = time_interleaved({k: v[0] for k, v in sampling.items()}, repeats=cfg.repeats, warmup=cfg.warmup, device=device)
    sample_spi = {k: median(t) / cfg.batch_size for k, t in sample_times.items()}

    benches = {}
    # memory of the full-loss setup: models, optimizers and one step's activations (built first)
    with PeakMemory(device) as peak:
        benches["scalewise-full"] = training_workload("scalewise-full", name, config, schedule, dataset, "scalewise", False, cfg.batch_size, device)
        benches["scalewise-full"].run()
    for bench_name, mode, mmd_only in (("scalewise-mmd", "scalewise", True), ("fullres-full", "fullres", False), ("fullres-mmd", "fullres", True)):
        benches[bench_name] = training_workload(bench_name, name, config, schedule, dataset, mode, mmd_only, cfg.batch_size, device)
    # each round runs every variant once per stage, so scale-wise averages over its sizes
    rounds = {k: (lambda b=b: [b.run() for _ in range(n)]) for k, b in benches.items()}
    train_times = time_interleaved(rounds, repeats=cfg.train_repeats, warmup=0, device=device)
    train_spi = {k: median(t) / n for k, t in train_times.items()}

    patch = model.patch_size
    width = int(model.transformer.config.num_attention_heads * model.transformer.config.attention_head_dim)
    cond_tokens = int(model.condition(values[:1]).tokens.shape[1])
    result = {
        "device": str(device),
        "model": name,
        "batch_size": cfg.batch_size,
        "schedule": {"sizes": [list(s) for s in schedule.sizes], "sigmas": list(schedule.sigmas)},
        "sample_compile": cfg.compile,
        "sample_seconds_per_image": sample_spi,
        "sample_nfe": {k: network_evaluations(v[1], v[2]) for k, v in sampling.items()},
        "sample_ratio_swd_over_fullres": sample_spi[f"swd-{n}"] / sample_spi[f"fullres-{n}"],
        "ideal_token_ratio": ideal_token_ratio(schedule, patch),
        "ideal_flops_ratio": ideal_flops_ratio(schedule, patch, width, cond_tokens),
        "train_seconds_per_iteration": train_spi,
        "train_ratio_scalewise_over_fullres": train_spi["scalewise-full"] / train_spi["fullres-full"],
        "train_ratio_mmd_over_full": train_spi["scalewise-mmd"] / train_spi["scalewise-full"],
        "peak_memory_mb": peak.added_bytes / 2**20,
        "peak_memory_kind": "CUDA peak allocated over the start" if device.type == "cuda" else "growth of the process RSS (CPU), polled",
        "params_held": benches["scalewise-full"].params_held,
        "critic_updates": config.distill.critic.updates,
        "raw": {"sample_seconds_per_round": sample_times, "train_seconds_per_round": train_times},
    }
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "config.yaml")
    (out / "bench.json").write_text(json.dumps(result, indent=1))
    table = bench_table(result)
    (out / "bench.md").write_text(table + "\n")
    bench_plot(result, out / "bench.png")
    print(table)
    return result


def bench_table(r: dict) -> str:
    lines = ["| sampler | network evals / image | seconds / image |", "|---|---|---|"]
    for name, spi in r["sample_seconds_per_image"].items():
        lines.append(f"| {name} | {r['sample_nfe'][name]} | {spi:.4f} |")
    lines += [
        "",
        f"SwD / full resolution sampling: **{r['sample_ratio_swd_over_fullres']:.3f}** (ideal from tokens "
        f"{r['ideal_token_ratio']:.3f}, with the attention term {r['ideal_flops_ratio']:.3f})",
        "",
        "| training iteration | seconds / iteration |",
        "|---|---|",
    ]
    for name, spi in r["train_seconds_per_iteration"].items():
        lines.append(f"| {name} | {spi:.3f} |")
    lines += [
        "",
        f"scale-wise / full resolution (full loss): **{r['train_ratio_scalewise_over_fullres']:.3f}**; "
        f"MMD only / full loss (scale-wise): **{r['train_ratio_mmd_over_full']:.3f}**; "
        f"peak memory of a full-loss step {r['peak_memory_mb']:.0f} MB ({r['peak_memory_kind']}); "
        f"parameters held {r['params_held']:,} ({r['device']}, batch {r['batch_size']})",
    ]
    return "\n".join(lines)


def bench_plot(r: dict, path: Path) -> Path:
    fig = Figure(figsize=(10, 3.6))  # no pyplot: no backend, no global figure state
    axes = fig.subplots(1, 2)
    for ax, key, title in ((axes[0], "sample_seconds_per_image", "sampling, s / image"), (axes[1], "train_seconds_per_iteration", "training, s / iteration")):
        names = list(r[key])
        ax.barh(names, [r[key][k] for k in names], color="#4477aa")
        ax.set_title(f"{title} (batch {r['batch_size']}, {r['device']})")
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path

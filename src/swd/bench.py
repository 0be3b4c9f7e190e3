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

import copy
import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .commands import condition_values_for, load_model, resolve_device
from .config import Config, save_config
from .distill.inputs import check_index_range, loss_grid, stage_inputs, training_schedule
from .distill.models import build_distill_models
from .distill.step import BatchNoise, LossContext
from .generate import generate_scalewise, generate_teacher, network_evaluations
from .models import Denoiser
from .schedule import ScaleSchedule
from .timing import median, synchronize, time_interleaved


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
        import psutil

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
    run: object  # () -> None
    params_held: int


def training_workload(name: str, teacher_dir: str, config: Config, dataset, mode: str, mmd_only: bool, batch_size: int, device: torch.device) -> TrainingBench:
    from accelerate import Accelerator

    from .distill.trainer import _optimizer, iteration
    from .models import load_denoiser
    from .train.common import load_batch

    cfg = copy.deepcopy(config.distill)
    if mmd_only:
        cfg.dmd_weight, cfg.gan_weight = 0.0, 0.0
    teacher, _ = load_denoiser(teacher_dir)
    models = build_distill_models(teacher, cfg)
    models.base.to(device)
    models.student.denoiser.to(device)
    schedule = training_schedule(ScaleSchedule(config.schedule.sizes, config.schedule.sigmas), mode)
    grid = loss_grid(cfg.grid_steps, cfg.grid_shift).to(device)
    ranges = {k: check_index_range(f"{k}_indices", getattr(cfg, f"{k}_indices"), len(grid)) for k in ("dmd", "mmd", "critic")}
    accelerator = Accelerator(cpu=device.type == "cpu")
    student_params = models.student.trainable_parameters()
    critic_params = models.critic.trainable_parameters() if models.critic is not None else []
    opt_g = _optimizer(student_params, cfg.lr, cfg)
    opt_c = _optimizer(critic_params, cfg.critic_lr, cfg) if critic_params else None
    counter = {"step": 0}

    def run() -> None:
        step = counter["step"]
        counter["step"] += 1
        stage = step % schedule.num_steps
        noise = BatchNoise(0, step, batch_size, 0, 1, device)
        batch = load_batch(dataset, step, batch_size, 0)
        images, labels = batch["image"].to(device), batch["label"].to(device)
        with torch.no_grad():
            cond = models.base.condition(labels)
            null = models.base.null_condition(batch_size) if cfg.dmd_weight > 0 else None
        inputs = stage_inputs(images, schedule, stage, noise.randn(images.shape[1], *schedule.sizes[stage]))
        ctx = LossContext(inputs, cond, null, labels if models.student.owns_conditioner else cond, grid, ranges)
        iteration(accelerator, models, models.student, models.critic, (opt_g, opt_c), (student_params, critic_params), ctx, noise, cfg, step)

    return TrainingBench(name, run, models.parameters_held())


def run_bench(config: Config) -> dict:
    """Measure, print and write ``bench.json``, ``bench.md`` and ``bench.png`` to ``output_dir``."""
    cfg = config.bench
    device = resolve_device(config.device)
    if not config.checkpoint:
        config.checkpoint = config.distill.teacher
    model: Denoiser = load_model(config)
    schedule = ScaleSchedule(config.schedule.sizes, config.schedule.sigmas)
    model.check_schedule(schedule)
    n = schedule.num_steps
    fullres = ScaleSchedule.constant(schedule.final_size, schedule.sigmas)
    half = half_schedule(schedule)
    values = condition_values_for(model, cfg.batch_size)
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

    from .models import load_model_config
    from .train.common import build_dataset

    teacher_dir = str(Path(load_checkpoint_dir(config)))
    dataset = build_dataset(config.data, load_model_config(teacher_dir))  # loaded before the memory measurement
    benches = {}
    # memory of the full-loss setup: models, optimizers and one step's activations (built first)
    with PeakMemory(device) as peak:
        benches["scalewise-full"] = training_workload("scalewise-full", teacher_dir, config, dataset, "scalewise", False, cfg.batch_size, device)
        benches["scalewise-full"].run()
    for name, mode, mmd_only in (("scalewise-mmd", "scalewise", True), ("fullres-full", "fullres", False), ("fullres-mmd", "fullres", True)):
        benches[name] = training_workload(name, teacher_dir, config, dataset, mode, mmd_only, cfg.batch_size, device)
    # each round runs every variant once per stage, so scale-wise averages over its sizes
    rounds = {name: (lambda b=b: [b.run() for _ in range(n)]) for name, b in benches.items()}
    train_times = time_interleaved(rounds, repeats=cfg.train_repeats, warmup=0, device=device)
    train_spi = {k: median(t) / n for k, t in train_times.items()}

    patch = model.patch_size
    width = int(model.transformer.config.num_attention_heads * model.transformer.config.attention_head_dim)
    cond_tokens = int(model.condition(values[:1]).tokens.shape[1])
    result = {
        "device": str(device),
        "batch_size": cfg.batch_size,
        "schedule": {"sizes": [list(s) for s in schedule.sizes], "sigmas": list(schedule.sigmas)},
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
        "critic_updates": config.distill.critic_updates,
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


def load_checkpoint_dir(config: Config) -> Path:
    from .commands import resolve_checkpoint

    return resolve_checkpoint(config.checkpoint)


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, key, title in ((axes[0], "sample_seconds_per_image", "sampling, s / image"), (axes[1], "train_seconds_per_iteration", "training, s / iteration")):
        names = list(r[key])
        ax.barh(names, [r[key][k] for k in names], color="#4477aa")
        ax.set_title(f"{title} (batch {r['batch_size']}, {r['device']})")
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

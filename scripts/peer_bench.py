"""swd's distillation iteration against the SwD authors' losses: time and memory, side by side in one run.

    python scripts/peer_bench.py --authors-src ../shared/peer/swd-authors

``--authors-src DIR`` names a folder holding the authors' ``src/`` (``losses.py``,
``flow_matching_sampler.py``, ``transformer_with_discriminator.py``, with their Apache-2.0 licence).
Those files are imported from there, unmodified, and never copied into this project.

Both sides train the identical model on the identical batch:

- the model: swd's built-in backbone, a diffusers ``SD3Transformer2DModel`` (default 4 layers,
  4 heads x 32, patch 2) on 4-channel 32x32 inputs, the model space of a latent teacher (no codec,
  so neither side pays for a VAE), class-conditioned through 4 label tokens; saved once and loaded
  by both sides from the same directory;
- the training: batch 8, LoRA rank 16 on to_q/to_k/to_v/to_out.0/net.0.proj/net.2, 5 critic
  (fake model) updates per generator update, the loss weights, noise ranges, guidance and AdamW
  settings of swd's ``DistillConfig``, translated into the authors' ``args``;
- the batch: the same data set, step and stage (scale-wise stages rotate with the step); each
  iteration reads its batch and builds its stage inputs on both sides. The authors' loop draws a
  fresh batch after every fake-model update; here all updates of an iteration share one.

swd's side is its trainer's iteration exactly as ``swd bench`` builds it
(:func:`swd.bench.training_workload`). The authors' side is their training loop's body: their
models (a student PeftModel that is also the teacher with its adapter disabled, a deep copy for
the fake model with their feature-extracting forward and GAN head), then per iteration
``fake_diffusion_loss`` ``n_steps_fake_dmd`` times (DMD runs only) and ``generator_loss`` once.

Four pairs are timed in interleaved rounds (median): scale-wise and full resolution, each with
the full loss (MMD + DMD + GAN, critic updates) and with MMD alone; a round runs one iteration per
stage. Peak memory is measured the same way for both sides, on a wider model whose weights
dominate memory (``--memory-*``): what the setup (models, optimizers) and one full-loss
scale-wise iteration add over the process's state before them, as the growth of the process RSS
on CPU (``swd.bench.PeakMemory``, freed memory returned to the system first) or
``torch.cuda.max_memory_allocated`` on CUDA.

Writes ``results/peer_bench.json`` (``--out``): ``ratio_scalewise`` and ``ratio_fullres`` (full
loss), ``ratio_mmd`` (scale-wise, MMD alone; ``ratio_mmd_fullres`` at full resolution), each swd's
seconds per iteration over the authors', and ``memory_ratio`` (swd's peak over the authors'); with
the per-round times, the models, the settings and the command.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import dataclasses
import gc
import hashlib
import importlib.util
import json
import shlex
import subprocess
import sys
import tempfile
import types
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from diffusers import FlowMatchEulerDiscreteScheduler
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from swd.bench import PeakMemory, TrainingBench, training_workload
from swd.config import SWD4_GRID_INDICES, SWD4_SIZES, Config, CriticConfig, DistillConfig, LoraConfig, ModelConfig
from swd.distill.iteration import adamw
from swd.distill.stage import stage_of, training_schedule
from swd.models import build_denoiser, load_denoiser, save_denoiser
from swd.registry import resolve_device
from swd.schedule import ScaleSchedule
from swd.timing import median, time_interleaved
from swd.train.batches import load_batch

ROOT = Path(__file__).resolve().parents[1]
AUTHORS_FILES = ("losses.py", "flow_matching_sampler.py", "transformer_with_discriminator.py")
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "net.0.proj", "net.2"]
GRID_STEPS, GRID_SHIFT = 28, 3.0  # the teacher grid both sides draw noise levels from
VARIANTS = (("scalewise", False), ("scalewise", True), ("fullres", False), ("fullres", True))  # (mode, MMD only)


def variant_name(mode: str, mmd_only: bool) -> str:
    return f"{mode}-{'mmd' if mmd_only else 'full'}"


# --- the authors' code, imported from DIR/src ------------------------------------------------------

def authors_src(directory: Path) -> Path:
    """``DIR/src`` holding the authors' three files, or SystemExit with one line saying what is missing."""
    src = Path(directory) / "src"
    missing = [name for name in AUTHORS_FILES if not (src / name).is_file()]
    if missing:
        raise SystemExit(f"peer_bench.py: --authors-src {directory}: no {', '.join(f'src/{m}' for m in missing)}; "
                         f"give the folder that holds the authors' src/ ({', '.join(AUTHORS_FILES)}), e.g. ../shared/peer/swd-authors")
    return src


def import_authors(src: Path) -> types.SimpleNamespace:
    """The authors' modules, each imported from its file under a name of its own (their package is
    called ``src``, which must not shadow anything here)."""
    modules = {}
    for name in AUTHORS_FILES:
        stem = Path(name).stem
        spec = importlib.util.spec_from_file_location(f"swd_authors_src.{stem}", src / name)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        modules[stem] = module
    return types.SimpleNamespace(losses=modules["losses"], sampler=modules["flow_matching_sampler"],
                                 discriminator=modules["transformer_with_discriminator"])


def file_digests(src: Path) -> dict[str, str]:
    return {name: hashlib.sha256((src / name).read_bytes()).hexdigest()[:16] for name in AUTHORS_FILES}


class ModuleWrapper(nn.Module):
    """The model under ``.module``, as the DDP wrapping of the authors' multi-GPU runs gives it
    (their losses read ``transformer_fake.module.cls_pred_branch``); one process gets no DDP."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def authors_args(cfg: DistillConfig, feature_block: int, batch_size: int, mmd_only: bool) -> types.SimpleNamespace:
    """The authors' ``args`` (their ``main.py`` options) for the settings of swd's ``cfg``.

    Their noise index ranges end exclusive (``torch.randint``), swd's inclusive.
    """
    loss, noise = cfg.loss, cfg.noise
    return types.SimpleNamespace(
        train_batch_size=batch_size,
        max_grad_norm=cfg.optim.grad_clip,
        n_steps_fake_dmd=cfg.critic.updates,
        num_discriminator_layers=cfg.critic.head_layers,
        cls_blocks=[feature_block],
        mmd_blocks=[feature_block],
        do_dmd_loss=loss.dmd_weight > 0 and not mmd_only,
        do_gan_loss=loss.gan_weight > 0 and not mmd_only,
        do_mmd_loss=loss.mmd_weight > 0,
        dmd_loss_weight=loss.dmd_weight,
        gen_cls_loss_weight=loss.gan_weight,
        disc_cls_loss_weight=loss.critic_gan_weight,
        mmd_loss_weight=loss.mmd_weight,
        cfg_teacher=loss.dmd_guidance,
        cfg_fake=1.0,
        dmd_noise_start_idx=noise.dmd_indices[0],
        dmd_noise_end_idx=noise.dmd_indices[1] + 1,
        mmd_noise_start_idx=noise.mmd_indices[0],
        mmd_noise_end_idx=noise.mmd_indices[1] + 1,
        mmd_kernel=loss.mmd_kernel,
        mmd_rbf_sigma=loss.mmd_rbf_bandwidth,
        huber_c=loss.mmd_huber_c,
        do_batch_mmd=False,
    )


def authors_workload(name: str, authors: types.SimpleNamespace, teacher: Path, config: Config, schedule: ScaleSchedule,
                     grid_indices: list[int], dataset: Dataset, mode: str, mmd_only: bool, batch_size: int,
                     device: torch.device) -> TrainingBench:
    """The authors' setup and loop body on a fresh copy of ``teacher``; each call of ``run`` is one
    iteration at the next step's stage and batch (the batch and stage swd's workload sees at that step)."""
    cfg = config.distill
    trained = training_schedule(schedule, mode)
    base, _ = load_denoiser(teacher)  # the conditioner gives the prompt embeddings, the transformer is trained
    base.requires_grad_(False).to(device)
    block = len(base.blocks) // 2 if cfg.critic.feature_block is None else cfg.critic.feature_block
    args = authors_args(cfg, block, batch_size, mmd_only)

    # their prepare_models: a LoRA student that is also the teacher (adapter disabled), a LoRA'd deep copy as the fake model
    lora = PeftLoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.alpha or cfg.lora.rank, init_lora_weights="gaussian",
                          target_modules=list(cfg.lora.targets))
    fake = copy.deepcopy(base.transformer)
    student = get_peft_model(base.transformer, lora)
    fake = get_peft_model(fake, lora)
    fake.forward = types.MethodType(authors.discriminator.forward_with_feature_extraction, fake)  # as their train.py does
    fake = ModuleWrapper(authors.discriminator.TransformerCls(args, fake))
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=device.type == "cpu")
    student, fake = accelerator.prepare(student, fake)
    params_g = [p for p in student.parameters() if p.requires_grad]
    params_c = [p for p in fake.parameters() if p.requires_grad]
    opt_g, opt_c = accelerator.prepare(adamw(params_g, cfg.optim.lr, cfg.optim), adamw(params_c, cfg.optim.critic_lr, cfg.optim))

    scheduler = FlowMatchEulerDiscreteScheduler(shift=GRID_SHIFT)
    scales = [h for h, _ in trained.sizes]  # the authors' solver is for square sizes
    solver = authors.sampler.FlowMatchingSolver(scheduler, GRID_STEPS, trained.num_steps, scales, [*grid_indices, GRID_STEPS])
    with torch.no_grad():
        null = base.null_condition(batch_size)  # their unconditional embeddings, made once before the loop
    counter = {"step": 0}
    losses = authors.losses

    def run() -> None:
        step = counter["step"]
        counter["step"] += 1
        stage = stage_of(step, trained.num_steps)
        batch = load_batch(dataset, step, batch_size, config.seed)
        with torch.no_grad():  # their sample_batch: latents at this stage's size and the previous one, prompt embeddings
            images = batch["image"].to(device)
            cond = base.condition(batch["label"].to(device))
            model_input = base.to_model_space(images, trained.sizes[stage])  # (B, C, h_i, w_i)
            model_input_down = base.to_model_space(images, trained.previous_size(stage))  # (B, C, h_i-1, w_i-1)
        idx_start = solver.boundary_start_idx[stage].repeat(batch_size)
        timesteps_start = scheduler.timesteps[idx_start].to(device)
        if args.do_dmd_loss:
            for _ in range(args.n_steps_fake_dmd):
                losses.fake_diffusion_loss(student, fake, cond.tokens, cond.pooled, model_input, timesteps_start, idx_start,
                                           opt_c, params_c, torch.float32, scheduler, solver, accelerator, args,
                                           model_input_down=model_input_down)
        losses.generator_loss(student, fake, student, cond.tokens, cond.pooled, null.tokens, null.pooled, model_input,
                              timesteps_start, idx_start, opt_g, params_g, torch.float32, scheduler, solver, accelerator, args,
                              model_input_down=model_input_down)

    held = {id(p): p.numel() for m in (student, fake) for p in m.parameters()}
    return TrainingBench(name, run, sum(held.values()))


# --- the shared model and data ----------------------------------------------------------------------

class RandomImages(Dataset):
    """Fixed random images (C, H, W) in [-1, 1] with class labels: what both sides read."""

    def __init__(self, size: int, channels: int, side: int, num_classes: int, seed: int):
        generator = torch.Generator().manual_seed(seed)
        self.images = torch.rand(size, channels, side, side, generator=generator) * 2 - 1
        self.labels = torch.randint(0, num_classes, (size,), generator=generator)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "label": int(self.labels[i])}


def model_config(layers: int, heads: int, head_dim: int, latent: int, channels: int, patch: int) -> ModelConfig:
    width = heads * head_dim
    return ModelConfig(kind="sd3", sample_size=latent, patch_size=patch, in_channels=channels, num_layers=layers,
                       attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=width,
                       caption_projection_dim=width, pooled_projection_dim=width, pos_embed_max_size=latent // patch,
                       conditioning="class", num_classes=10, num_condition_tokens=4)


def describe(cfg: ModelConfig, parameters: int) -> dict:
    return {"backbone": "diffusers SD3Transformer2DModel (swd's built-in backbone, class-conditioned, no codec)",
            "layers": cfg.num_layers, "heads": cfg.num_attention_heads, "head_dim": cfg.attention_head_dim,
            "width": cfg.num_attention_heads * cfg.attention_head_dim, "patch": cfg.patch_size,
            "input": [cfg.in_channels, cfg.sample_size, cfg.sample_size], "condition_tokens": cfg.num_condition_tokens,
            "parameters": parameters}


def save_teacher(cfg: ModelConfig, directory: Path, seed: int) -> tuple[Path, int]:
    torch.manual_seed(seed)
    model = build_denoiser(cfg)
    save_denoiser(model, directory, cfg)
    return directory, sum(p.numel() for p in model.parameters())


def scalewise_schedule(latent: int, patch: int, sizes: list[int] | None, grid_indices: list[int]) -> ScaleSchedule:
    """The given sizes, or the 16-20-24-32 schedule scaled to ``latent`` (multiples of the patch),
    with sigmas at ``grid_indices`` of the teacher grid."""
    if sizes is None:
        sizes = [max(patch, round(latent * s / SWD4_SIZES[-1] / patch) * patch) for s in SWD4_SIZES]
    if len(sizes) != len(grid_indices):
        raise SystemExit(f"peer_bench.py: {len(sizes)} sizes but {len(grid_indices)} grid indices; give one index per size")
    return ScaleSchedule.from_grid(sizes, grid_indices, GRID_STEPS, GRID_SHIFT)


def distill_config(rank: int, critic_updates: int) -> DistillConfig:
    return DistillConfig(lora=LoraConfig(rank=rank, targets=list(LORA_TARGETS)), critic=CriticConfig(updates=critic_updates))


# --- measuring ---------------------------------------------------------------------------------------

def release_memory(device: torch.device) -> None:
    """Garbage collected, the CUDA cache emptied, glibc's free heap pages returned to the system."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    libc = ctypes.CDLL(None)
    if hasattr(libc, "malloc_trim"):  # glibc only; elsewhere freed memory may stay in the process
        libc.malloc_trim(0)


def peak_added_bytes(build: Callable[[], TrainingBench], device: torch.device) -> tuple[int, int, bool]:
    """Memory the setup and one iteration add at their peak (:class:`swd.bench.PeakMemory`), the
    parameters the setup holds, and whether its adapters ran folded."""
    release_memory(device)
    with PeakMemory(device) as peak:
        bench = build()
        bench.run()
    held, folds = bench.params_held, bench.folds
    del bench
    release_memory(device)
    return peak.added_bytes, held, folds


def git_commit() -> str | None:
    proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return proc.stdout.strip() or None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--authors-src", type=Path, required=True, help="folder holding the authors' src/")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "peer_bench.json")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--latent", type=int, default=32, help="side of the model's input (the latent)")
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--patch", type=int, default=2)
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="scale-wise sizes (default: 16-20-24-32 scaled to --latent)")
    parser.add_argument("--grid-indices", type=int, nargs="+", default=list(SWD4_GRID_INDICES), help="sigma of each stage on the 28-step grid")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--critic-updates", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (median); a round is one iteration per stage")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--memory-layers", type=int, default=4)
    parser.add_argument("--memory-heads", type=int, default=16, help="1024 wide with --memory-head-dim 64: 550 MB of weights, "
                        "twice what the activations, adapters and optimizer states add at batch 2 (at 512 wide they are about equal)")
    parser.add_argument("--memory-head-dim", type=int, default=64)
    parser.add_argument("--memory-latent", type=int, default=32)
    parser.add_argument("--memory-batch-size", type=int, default=2)
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: what accelerate picks)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for flag in ("layers", "memory_layers"):
        if getattr(args, flag) < 2:
            parser.error(f"--{flag.replace('_', '-')} must be >= 2: the feature block is layers // 2, and the authors' "
                         "feature forward takes no features from block 0")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    src = authors_src(args.authors_src)
    authors = import_authors(src)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    config = Config(distill=distill_config(args.lora_rank, args.critic_updates), seed=args.seed)
    schedule = scalewise_schedule(args.latent, args.patch, args.sizes, args.grid_indices)
    with tempfile.TemporaryDirectory() as work:  # the saved teachers both sides load
        result = measure(args, authors, src, config, schedule, device, Path(work))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(table(result))
    return result


def measure(args: argparse.Namespace, authors: types.SimpleNamespace, src: Path, config: Config, schedule: ScaleSchedule,
            device: torch.device, work: Path) -> dict:
    """Time the four pairs, measure peak memory; the result as written to ``--out``."""
    n = schedule.num_steps
    timing_cfg = model_config(args.layers, args.heads, args.head_dim, args.latent, args.channels, args.patch)
    teacher, parameters = save_teacher(timing_cfg, work / "timing", args.seed)
    dataset = RandomImages(max(256, 2 * args.batch_size), args.channels, args.latent, timing_cfg.num_classes, args.seed)
    benches: dict[str, TrainingBench] = {}
    with tqdm(total=2 * len(VARIANTS), desc="building workloads") as bar:
        for mode, mmd_only in VARIANTS:
            variant = variant_name(mode, mmd_only)
            benches[f"swd/{variant}"] = training_workload(variant, str(teacher), config, schedule, dataset, mode, mmd_only,
                                                          args.batch_size, device)
            bar.update()
            benches[f"authors/{variant}"] = authors_workload(variant, authors, teacher, config, schedule, args.grid_indices,
                                                             dataset, mode, mmd_only, args.batch_size, device)
            bar.update()
    rounds = {k: (lambda b=b: [b.run() for _ in range(n)]) for k, b in benches.items()}
    times = time_interleaved(rounds, repeats=args.rounds, warmup=args.warmup, device=device)
    seconds = {k: median(t) / n for k, t in times.items()}
    held = {k: b.params_held for k, b in benches.items()}
    timing_folds = benches["swd/scalewise-full"].folds
    del benches, rounds

    def ratio(variant: str) -> float:
        return seconds[f"swd/{variant}"] / seconds[f"authors/{variant}"]

    # memory: a wider model, so that the weights (one base for swd, the authors' copies) dominate
    memory_cfg = model_config(args.memory_layers, args.memory_heads, args.memory_head_dim, args.memory_latent, args.channels, args.patch)
    memory_teacher, memory_parameters = save_teacher(memory_cfg, work / "memory", args.seed)
    memory_schedule = schedule if args.memory_latent == args.latent else scalewise_schedule(args.memory_latent, args.patch, None, args.grid_indices)
    memory_data = RandomImages(max(256, 2 * args.memory_batch_size), args.channels, args.memory_latent, memory_cfg.num_classes, args.seed)
    folded = dataclasses.replace(config, distill=dataclasses.replace(config.distill, fold_adapters=True))
    builders = {  # swd first: memory left over from the first measurement could only favour the authors
        "swd": lambda: training_workload("memory", str(memory_teacher), config, memory_schedule, memory_data, "scalewise", False,
                                         args.memory_batch_size, device),
        "swd-folded": lambda: training_workload("memory", str(memory_teacher), folded, memory_schedule, memory_data, "scalewise",
                                                False, args.memory_batch_size, device),
        "authors": lambda: authors_workload("memory", authors, memory_teacher, config, memory_schedule, args.grid_indices,
                                            memory_data, "scalewise", False, args.memory_batch_size, device),
    }
    measured = {side: peak_added_bytes(build, device) for side, build in tqdm(builders.items(), desc="peak memory")}
    added = {side: m[0] for side, m in measured.items()}
    if min(added.values()) <= 0:
        raise SystemExit(f"peer_bench.py: a side added no memory ({added}); use a larger --memory-* model")

    return {
        "command": shlex.join(["python", *sys.argv]),
        "swd_commit": git_commit(),
        "authors_src": str(src.resolve()),
        "authors_files_sha256": file_digests(src),
        "device": str(device),
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "batch_size": args.batch_size,
        "model": describe(timing_cfg, parameters),
        "lora": {"rank": args.lora_rank, "targets": LORA_TARGETS},
        "critic_updates": args.critic_updates,
        "schedule": {"sizes": [list(s) for s in schedule.sizes], "sigmas": list(schedule.sigmas), "grid_indices": args.grid_indices},
        "ratio_scalewise": ratio("scalewise-full"),
        "ratio_fullres": ratio("fullres-full"),
        "ratio_mmd": ratio("scalewise-mmd"),
        "ratio_mmd_fullres": ratio("fullres-mmd"),
        "memory_ratio": added["swd"] / added["authors"],
        "memory_ratio_folded": added["swd-folded"] / added["authors"],  # distill.fold_adapters=true: one folded copy more
        "fold_adapters": {"setting": config.distill.fold_adapters, "timing_model_folds": timing_folds,
                          "memory_model_folds": measured["swd"][2]},
        "seconds_per_iteration": seconds,
        "params_held": held,
        "peak_memory_mb": {k: v / 2**20 for k, v in added.items()},
        "peak_memory_kind": ("CUDA max_memory_allocated over the allocation at the start" if device.type == "cuda" else
                             "growth of the process RSS over its value at the start (CPU, polled every 2 ms, freed memory returned first)"),
        "peak_memory_of": "setup (models, optimizers) and one full-loss scale-wise iteration (first stage)",
        "memory_model": describe(memory_cfg, memory_parameters),
        "memory_batch_size": args.memory_batch_size,
        "memory_params_held": {side: m[1] for side, m in measured.items()},
        "memory_base_weights_mb": memory_parameters * 4 / 2**20,  # fp32
        "iterations_per_round": n,
        "raw": {"seconds_per_round": times},
    }


def table(r: dict) -> str:
    s = r["seconds_per_iteration"]
    lines = ["| iteration | authors' code | swd | swd / authors |", "|---|---|---|---|"]
    for mode, mmd_only in VARIANTS:
        variant = variant_name(mode, mmd_only)
        lines.append(f"| {variant} | {s[f'authors/{variant}']:.3f} s | {s[f'swd/{variant}']:.3f} s | "
                     f"{s[f'swd/{variant}'] / s[f'authors/{variant}']:.2f} |")
    m = r["peak_memory_mb"]
    lines += ["", f"peak memory of a full-loss setup and step: swd {m['swd']:.0f} MB, authors {m['authors']:.0f} MB, "
              f"ratio **{r['memory_ratio']:.2f}** (one base of {r['memory_base_weights_mb']:.0f} MB, width "
              f"{r['memory_model']['width']}, {r['peak_memory_kind']}); with distill.fold_adapters=true "
              f"{m['swd-folded']:.0f} MB, ratio {r['memory_ratio_folded']:.2f}",
              f"(swd folds its adapters (distill.fold_adapters={r['fold_adapters']['setting']}): timing model "
              f"{r['fold_adapters']['timing_model_folds']}, memory model {r['fold_adapters']['memory_model_folds']})",
              f"({r['device']}, batch {r['batch_size']}, {r['critic_updates']} critic updates, LoRA rank {r['lora']['rank']})"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()

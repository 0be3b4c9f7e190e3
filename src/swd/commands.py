"""What ``swd sample``, ``swd eval`` and ``swd demo`` do, as plain functions of a Config.

Each command decides once how it samples (:func:`resolve_sampler`: the teacher's ODE or a
scale-wise schedule, from the config or from a student's record) and passes that down; the
config itself is never changed.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .config import Config, save_config
from .distill.trainer import distill
from .generate import Sampler, condition_values_for
from .metrics.classifier import class_accuracy, default_classifier_dir, load_classifier
from .metrics.fid import fid_score, reference_for_fashion_mnist
from .models import Denoiser
from .prompts import prompts_from
from .registry import is_pipeline_reference, load_model, model_name, resolve_checkpoint, resolve_device
from .schedule import ScaleSchedule
from .student import read_student_record, schedule_of
from .timing import synchronize
from .viz import save_grid, save_strip, side_by_side

SAMPLER_FILE = "sampler.json"


def resolve_sampler(config: Config, name: str, mode: str | None = None, guidance: float | None = None) -> Sampler:
    """How to sample the model ``name``.

    A distilled student (``student.json`` / ``swd_lora.json``) defaults to mode "student": the
    schedule of its record, with its guidance (1.0 unless it embeds guidance). Any other model
    defaults to the teacher sampler with ``teacher.guidance``; "scalewise" runs the config's
    ``schedule`` section.
    """
    record = None if is_pipeline_reference(name) else read_student_record(resolve_checkpoint(name))
    if mode is None:
        mode = "student" if record else "teacher"
    if mode == "student":
        if record is None:
            raise ValueError(f"mode 'student' needs a distilled checkpoint (with student.json); {name} is not one")
        mode, schedule = "scalewise", schedule_of(record)
    else:
        schedule = ScaleSchedule.from_config(config.schedule)
    default = float(record["guidance"]) if record else config.teacher.guidance
    return Sampler(mode, schedule, default if guidance is None else float(guidance), config.teacher.steps, config.teacher.shift,
                   config.schedule.upsample_mode)


def sampler_record(sampler: Sampler) -> dict:
    return {"mode": sampler.mode, "steps": sampler.steps, "guidance": sampler.guidance, "nfe": sampler.nfe,
            "schedule": {"sizes": [list(s) for s in sampler.schedule.sizes], "sigmas": list(sampler.schedule.sigmas)}}


def generate_many(model: Denoiser, sampler: Sampler, values, seed: int, batch_size: int, progress: bool = True, first_batch_callback=None):
    """All images for ``values`` in batches; returns (images on CPU, seconds spent sampling).

    ``first_batch_callback`` sees the per-step predictions of the first batch (for strips).
    """
    generator = torch.Generator().manual_seed(seed)
    out, seconds = [], 0.0
    for start in tqdm(range(0, len(values), batch_size), desc=f"sample ({sampler.mode})", disable=not progress):
        chunk = values[start : start + batch_size]
        t0 = time.perf_counter()
        images = sampler(model, chunk, generator, first_batch_callback if start == 0 else None)
        synchronize(images.device)
        seconds += time.perf_counter() - t0
        out.append(images.cpu())
    return torch.cat(out), seconds


def _write_run(config: Config, out: Path, sampler: Sampler) -> None:
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "config.yaml")
    (out / SAMPLER_FILE).write_text(json.dumps(sampler_record(sampler), indent=1))  # what was sampled, resolved


def run_sample(config: Config) -> list[Path]:
    cfg = config.sample
    name = model_name(config)
    model = load_model(name, config.model, resolve_device(config.device))
    sampler = resolve_sampler(config, name, cfg.mode, cfg.guidance)
    values = condition_values_for(model, cfg.num_images, cfg.labels, prompts_from(cfg.prompts, "sample.prompts"))
    out = Path(config.output_dir)
    _write_run(config, out, sampler)
    steps: list[torch.Tensor] = []
    callback = (lambda info: steps.append(info["denoised"].cpu())) if cfg.intermediates else None
    images, _ = generate_many(model, sampler, values, cfg.seed, cfg.batch_size, first_batch_callback=callback)
    written = [save_grid(images, out / "samples.png", nrow=cfg.nrow or model.num_classes)]
    if cfg.intermediates:
        written.append(save_strip(steps, out / "steps.png", rows=min(8, len(steps[0]))))
    return written


def quality(images: torch.Tensor, labels: torch.Tensor, cfg, device: torch.device) -> tuple[float, float]:
    """FID against the Fashion-MNIST test set (cached reference) and class accuracy of ``images``."""
    reference = reference_for_fashion_mnist(num_images=cfg.reference_images, device=device, batch_size=cfg.fid_batch_size)
    fid = fid_score(images, reference, batch_size=cfg.fid_batch_size, device=device)
    classifier = load_classifier(cfg.classifier or default_classifier_dir()).to(device)
    accuracy = class_accuracy(classifier, images.to(device), labels.to(device))
    return float(fid), float(accuracy)


def measure(model: Denoiser, sampler: Sampler, config: Config, name: str, callback=None) -> tuple[dict, torch.Tensor]:
    """Sample ``eval.num_samples`` images (classes in turn) and measure them; returns (record, images)."""
    cfg = config.eval
    values = condition_values_for(model, cfg.num_samples)
    images, seconds = generate_many(model, sampler, values, cfg.seed, cfg.batch_size, first_batch_callback=callback)
    fid, accuracy = quality(images, values, cfg, resolve_device(config.device))
    record = {
        "name": name,
        "mode": sampler.mode,
        "steps": sampler.steps,
        "guidance": sampler.guidance,
        "nfe": sampler.nfe,
        "fid": fid,
        "class_accuracy": round(accuracy, 4),
        "seconds_per_image": seconds / len(values),
        "num_samples": len(values),
    }
    print(summary_line(record))
    return record, images


def run_eval(config: Config, name: str | None = None) -> dict:
    """FID against the Fashion-MNIST test set, class accuracy, seconds per image."""
    checkpoint = model_name(config)
    device = resolve_device(config.device)
    model = load_model(checkpoint, config.model, device)
    if model.num_classes is None:
        raise ValueError("swd eval measures class-conditional Fashion-MNIST models; this model is text-conditioned")
    sampler = resolve_sampler(config, checkpoint, config.eval.mode, config.eval.guidance)
    record, images = measure(model, sampler, config, name or sampler.mode)
    record.update(fid=round(record["fid"], 3), reference_images=config.eval.reference_images, checkpoint=str(config.checkpoint), device=str(device))
    out = Path(config.output_dir)
    _write_run(config, out, sampler)
    save_grid(images[:100], out / f"{record['name']}_grid.png", nrow=10)
    (out / "eval.json").write_text(json.dumps(record, indent=1))
    return record


def summary_line(record: dict) -> str:
    return (
        f"{record['name']}: FID {record['fid']:.2f} | class accuracy {100 * record['class_accuracy']:.1f}% | "
        f"{record['seconds_per_image'] * 1000:.1f} ms/image | {record['nfe']} NFE | n={record['num_samples']}"
    )


def run_demo(config: Config) -> list[Path]:
    """Distil the shipped teacher for ``distill.max_minutes``, then compare three samplers.

    Rows: the teacher at its full guided step count, the same teacher on the 4-step scale-wise
    schedule (undistilled, guided), and the distilled student on that schedule. Each gets FID
    (``eval.num_samples`` vs ``eval.reference_images`` test images), class accuracy, network
    evaluations and seconds per image. Rerunning resumes the distillation where it stopped.
    """
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "config.yaml")
    student_dir = distill(dataclasses.replace(config, output_dir=str(out / "distill")))

    device = resolve_device(config.device)
    specs = [
        ("teacher", config.distill.teacher, "teacher", f"teacher, {config.teacher.steps} guided steps"),
        ("undistilled", config.distill.teacher, "scalewise", "teacher on the 4-step scale-wise schedule (not distilled)"),
        ("swd-student", str(student_dir), None, "SwD student, 4 scale-wise steps"),
    ]
    records, grids, captions, strip = [], [], [], None
    for name, checkpoint, mode, caption in specs:
        model = load_model(checkpoint, config.model, device)
        sampler = resolve_sampler(config, checkpoint, mode)
        steps: list[torch.Tensor] = []
        callback = (lambda info: steps.append(info["denoised"].cpu())) if name == "swd-student" else None
        record, images = measure(model, sampler, config, name, callback)
        record["fid"] = round(record["fid"], 2)
        records.append({k: record[k] for k in ("name", "steps", "guidance", "nfe", "fid", "class_accuracy", "seconds_per_image", "num_samples")})
        grids.append(images[:100])
        captions.append(caption)
        if steps:
            strip = steps
    paths = [save_grid(g, out / f"{r['name']}.png", nrow=10) for g, r in zip(grids, records)]
    paths.append(side_by_side(grids, captions, out / "side_by_side.png"))
    if strip is not None:
        paths.append(save_strip(strip, out / "student_steps.png", rows=10))
    (out / "demo.json").write_text(json.dumps(records, indent=1))
    paths.append(out / "demo.json")
    print(markdown_table(records))
    return paths


def markdown_table(records: list[dict]) -> str:
    lines = ["| sampler | steps | network evals / image | FID | class accuracy | ms / image |", "|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['name']} | {r['steps']} | {r['nfe']} | {r['fid']:.2f} | {100 * r['class_accuracy']:.1f}% | {1000 * r['seconds_per_image']:.1f} |")
    return "\n".join(lines)

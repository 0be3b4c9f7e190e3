"""What ``swd sample`` and ``swd eval`` do, as plain functions of a Config."""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import torch
from accelerate import PartialState

from .config import Config, ModelConfig, save_config
from .generate import generate_scalewise, generate_teacher, network_evaluations
from .models import Denoiser, load_denoiser
from .schedule import ScaleSchedule
from .viz import save_grid, save_strip

ASSETS = Path(__file__).parent / "assets"
BUILTIN_MODELS = {"teacher": ASSETS / "teacher"}


def resolve_checkpoint(name: str | None) -> Path:
    """A model directory: a path, or the name of a model shipped with swd ("teacher")."""
    if not name:
        raise ValueError("no model given: set checkpoint=DIR (a model directory) or checkpoint=teacher (the shipped teacher)")
    if name in BUILTIN_MODELS:
        return BUILTIN_MODELS[name]
    path = Path(name)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {name} does not exist; built-in models: {', '.join(BUILTIN_MODELS)}")
    return path


def is_pipeline_reference(name: str) -> bool:
    """A diffusers pipeline: a directory with ``model_index.json``, or a hub id ("org/name") that is no local path."""
    path = Path(name)
    if path.exists():
        return (path / "model_index.json").is_file()
    return name not in BUILTIN_MODELS and name.count("/") == 1 and not name.startswith((".", "/"))


def load_reference(name: str, model_cfg: ModelConfig | None = None) -> tuple[Denoiser, ModelConfig]:
    """A teacher by name: "teacher", an swd model directory, or a diffusers SD3 / FLUX pipeline
    (local directory or hub id, loaded with ``model_cfg``'s dtype, variant and revision)."""
    if is_pipeline_reference(name):
        from .models.pipelines import load_pipeline_denoiser

        return load_pipeline_denoiser(name, model_cfg)
    return load_denoiser(resolve_checkpoint(name))


def resolve_device(name: str | None) -> torch.device:
    return torch.device(name) if name else PartialState().device


def load_model(config: Config) -> Denoiser:
    """``checkpoint``: a model directory, a distilled student (merged), a student LoRA directory or
    a diffusers pipeline; with no checkpoint, ``model.pretrained``."""
    from .distill.export import LORA_FILE, load_student_lora

    name = config.checkpoint or config.model.pretrained
    if not name:
        raise ValueError("no model given: set checkpoint=DIR (a model directory), checkpoint=teacher (the shipped teacher) "
                         "or model.pretrained=PIPELINE (a diffusers SD3 / FLUX directory or hub id)")
    if not is_pipeline_reference(name) and (resolve_checkpoint(name) / LORA_FILE).is_file():
        model = load_student_lora(resolve_checkpoint(name))
    else:
        model, _ = load_reference(name, config.model)
    return model.to(resolve_device(config.device)).eval()


def resolve_sampling(config: Config, mode: str | None, guidance: float | None) -> tuple[str, float]:
    """The sampler and guidance to use for ``config.checkpoint``.

    A distilled student (``student.json`` / ``swd_lora.json``) defaults to mode "student": its own
    schedule (copied into ``config.schedule``, so the saved config shows it) without guidance. Any
    other model defaults to the teacher sampler with ``teacher.guidance``.
    """
    from .distill.export import read_student_record

    name = config.checkpoint or config.model.pretrained
    record = None if name and is_pipeline_reference(name) else read_student_record(resolve_checkpoint(name))
    if mode is None:
        mode = "student" if record else "teacher"
    if mode == "student":
        if record is None:
            raise ValueError(f"mode 'student' needs a distilled checkpoint (with student.json); {config.checkpoint} is not one")
        config.schedule.sizes = record["schedule"]["sizes"]
        config.schedule.sigmas = record["schedule"]["sigmas"]
        return "scalewise", float(record["guidance"]) if guidance is None else guidance
    default = float(record["guidance"]) if record else config.teacher.guidance
    return mode, default if guidance is None else guidance


def condition_values_for(model: Denoiser, n: int, labels=None, prompts=None):
    """Labels (cycling through the classes unless given) or prompts for ``n`` images."""
    if hasattr(model.conditioner, "num_classes"):
        k = model.conditioner.num_classes
        if labels:
            bad = [x for x in labels if not 0 <= int(x) < k]
            if bad:
                raise ValueError(f"labels {bad} are outside 0..{k - 1}")
            return torch.tensor([int(labels[i % len(labels)]) for i in range(n)])
        return torch.arange(n) % k
    if not prompts:
        raise ValueError("this model is text-conditioned: give sample.prompts=[\"a prompt\", ...]")
    return [prompts[i % len(prompts)] for i in range(n)]


def generate(model: Denoiser, config: Config, values, mode: str, guidance: float, generator: torch.Generator, callback=None) -> torch.Tensor:
    """One batch of images in [-1, 1] with the teacher sampler or the configured scale-wise
    schedule (sizes are in the model's space: latents for pipeline teachers, then decoded)."""
    if mode == "teacher":
        size = ScaleSchedule(config.schedule.sizes, config.schedule.sigmas).final_size
        x = generate_teacher(model, values, size, generator, config.teacher.steps, config.teacher.shift, guidance, callback)
    elif mode == "scalewise":
        schedule = ScaleSchedule(config.schedule.sizes, config.schedule.sigmas)
        x = generate_scalewise(model, values, schedule, generator, guidance, config.schedule.upsample_mode, callback)
    else:
        raise ValueError(f"unknown sampling mode {mode!r}; use 'teacher' or 'scalewise'")
    return model.decode(x)


def steps_of(config: Config, mode: str) -> int:
    return config.teacher.steps if mode == "teacher" else len(config.schedule.sizes)


def generate_many(model: Denoiser, config: Config, values, mode: str, guidance: float, seed: int, batch_size: int, progress: bool = True, first_batch_callback=None):
    """All images for ``values`` in batches; returns (images on CPU, seconds spent sampling).

    ``first_batch_callback`` sees the per-step predictions of the first batch (for strips).
    """
    from tqdm.auto import tqdm

    generator = torch.Generator().manual_seed(seed)
    out, seconds = [], 0.0
    for start in tqdm(range(0, len(values), batch_size), desc=f"sample ({mode})", disable=not progress):
        chunk = values[start : start + batch_size]
        t0 = time.perf_counter()
        images = generate(model, config, chunk, mode, guidance, generator, first_batch_callback if start == 0 else None)
        _synchronize(images.device)
        seconds += time.perf_counter() - t0
        out.append(images.cpu())
    return torch.cat(out), seconds


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_sample(config: Config) -> list[Path]:
    cfg = config.sample
    model = load_model(config)
    mode, guidance = resolve_sampling(config, cfg.mode, cfg.guidance)
    values = condition_values_for(model, cfg.num_images, cfg.labels, cfg.prompts)
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "config.yaml")
    steps: list[torch.Tensor] = []
    callback = (lambda info: steps.append(info["denoised"].cpu())) if cfg.intermediates else None
    images, _ = generate_many(model, config, values, mode, guidance, cfg.seed, cfg.batch_size, first_batch_callback=callback)
    nrow = cfg.nrow or (model.conditioner.num_classes if hasattr(model.conditioner, "num_classes") else None)
    written = [save_grid(images, out / "samples.png", nrow=nrow)]
    if cfg.intermediates:
        written.append(save_strip(steps, out / "steps.png", rows=min(8, len(steps[0]))))
    return written


def quality(images: torch.Tensor, labels: torch.Tensor, cfg, device: torch.device) -> tuple[float, float]:
    """FID against the Fashion-MNIST test set (cached reference) and class accuracy of ``images``."""
    from .metrics.classifier import class_accuracy, default_classifier_dir, load_classifier
    from .metrics.fid import fid_score, reference_for_fashion_mnist

    reference = reference_for_fashion_mnist(num_images=cfg.reference_images, device=device, batch_size=cfg.fid_batch_size)
    fid = fid_score(images, reference, batch_size=cfg.fid_batch_size, device=device)
    classifier = load_classifier(cfg.classifier or default_classifier_dir()).to(device)
    accuracy = class_accuracy(classifier, images.to(device), labels.to(device))
    return float(fid), float(accuracy)


def run_eval(config: Config, name: str | None = None) -> dict:
    """FID against the Fashion-MNIST test set, class accuracy, seconds per image."""
    cfg = config.eval
    model = load_model(config)
    if not hasattr(model.conditioner, "num_classes"):
        raise ValueError("swd eval measures class-conditional Fashion-MNIST models; this model is text-conditioned")
    mode, guidance = resolve_sampling(config, cfg.mode, cfg.guidance)
    device = resolve_device(config.device)
    values = condition_values_for(model, cfg.num_samples)
    images, seconds = generate_many(model, config, values, mode, guidance, cfg.seed, cfg.batch_size)
    fid, accuracy = quality(images, values, cfg, device)
    steps = steps_of(config, mode)
    record = {
        "name": name or mode,
        "mode": mode,
        "steps": steps,
        "guidance": guidance,
        "nfe": network_evaluations(steps, guidance),
        "fid": round(fid, 3),
        "class_accuracy": round(accuracy, 4),
        "seconds_per_image": seconds / cfg.num_samples,
        "num_samples": cfg.num_samples,
        "reference_images": cfg.reference_images,
        "checkpoint": str(config.checkpoint),
        "device": str(device),
    }
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "config.yaml")
    save_grid(images[:100], out / f"{record['name']}_grid.png", nrow=10)
    (out / "eval.json").write_text(json.dumps(record, indent=1))
    print(summary_line(record))
    return record


def summary_line(record: dict) -> str:
    return (
        f"{record['name']}: FID {record['fid']:.2f} | class accuracy {100 * record['class_accuracy']:.1f}% | "
        f"{record['seconds_per_image'] * 1000:.1f} ms/image | {record['nfe']} NFE | n={record['num_samples']}"
    )


def side_by_side(images: list[torch.Tensor], labels: list[str], path: Path, nrow: int = 10, per_row: int | None = None, scale: int = 2) -> Path:
    """Grids next to each other (``per_row`` per line, default all), a caption above each, one PNG."""
    from PIL import Image, ImageDraw

    from .viz import make_grid, to_uint8

    per_row = per_row or len(images)
    tiles = []
    for x in images:
        tile = to_uint8(make_grid(x, nrow)[None])[0]
        img = Image.fromarray(tile[..., 0] if tile.shape[-1] == 1 else tile).convert("RGB")
        tiles.append(img.resize((tile.shape[1] * scale, tile.shape[0] * scale), Image.NEAREST))
    pad, head = 12, 18
    cell_w, cell_h = max(t.size[0] for t in tiles) + pad, max(t.size[1] for t in tiles) + head + pad
    rows = -(-len(tiles) // per_row)
    canvas = Image.new("RGB", (pad + cell_w * min(per_row, len(tiles)), rows * cell_h), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (img, label) in enumerate(zip(tiles, labels)):
        left, top = pad + cell_w * (i % per_row), cell_h * (i // per_row)
        canvas.paste(img, (left, top + head))
        draw.text((left, top + 3), label, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


DEMO_CONFIG = ASSETS / "demo.yaml"


def run_demo(config: Config) -> list[Path]:
    """Distil the shipped teacher for ``distill.max_minutes``, then compare three samplers.

    Rows: the teacher at its full guided step count, the same teacher on the 4-step scale-wise
    schedule (undistilled, guided), and the distilled student on that schedule. Each gets FID
    (``eval.num_samples`` vs ``eval.reference_images`` test images), class accuracy, network
    evaluations and seconds per image. Rerunning resumes the distillation where it stopped.
    """
    from .distill.trainer import distill

    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "config.yaml")
    distill_config = copy.deepcopy(config)
    distill_config.output_dir = str(out / "distill")
    student_dir = distill(distill_config)

    device = resolve_device(config.device)
    specs = [
        ("teacher", config.distill.teacher, "teacher", f"teacher, {config.teacher.steps} guided steps"),
        ("undistilled", config.distill.teacher, "scalewise", "teacher on the 4-step scale-wise schedule (not distilled)"),
        ("swd-student", str(student_dir), None, "SwD student, 4 scale-wise steps"),
    ]
    records, grids, captions, strip = [], [], [], None
    for name, checkpoint, mode, caption in specs:
        row_config = copy.deepcopy(config)
        row_config.checkpoint = checkpoint
        mode, guidance = resolve_sampling(row_config, mode, None)
        model = load_model(row_config)
        values = condition_values_for(model, config.eval.num_samples)
        steps: list[torch.Tensor] = []
        callback = (lambda info: steps.append(info["denoised"].cpu())) if name == "swd-student" else None
        images, seconds = generate_many(model, row_config, values, mode, guidance, config.eval.seed, config.eval.batch_size, first_batch_callback=callback)
        fid, accuracy = quality(images, values, config.eval, device)
        n = steps_of(row_config, mode)
        record = {"name": name, "steps": n, "guidance": guidance, "nfe": network_evaluations(n, guidance), "fid": round(fid, 2),
                  "class_accuracy": round(accuracy, 4), "seconds_per_image": seconds / len(values), "num_samples": len(values)}
        print(summary_line(record))
        records.append(record)
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

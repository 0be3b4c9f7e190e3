"""What ``swd sample``, ``swd eval`` and ``swd demo`` do, as plain functions of a Config.

Each command decides once how it samples (:func:`resolve_sampler`: the teacher's ODE or a
scale-wise schedule, from the config or from a student's record) and passes that down; the
config itself is never changed.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from tqdm.auto import tqdm

from .config import Config, EvalConfig, load_config, save_config
from .distill.trainer import distill
from .generate import Sampler, check_compile_backend, compile_for_sampling, condition_values_for
from .metrics.classifier import class_accuracy, default_classifier_dir, load_classifier
from .metrics.clip import CLIPScorer
from .metrics.diversity import PRDC_KEYS, check_set_sizes, precision_recall
from .metrics.fid import FIDReference, InceptionV3Features, fid_from_features, inception_features, reference_for_fashion_mnist, resize_images
from .metrics.reference import REFERENCE_HELP, load_reference
from .metrics.twemoji_scorer import load_scorer
from .models import Denoiser
from .models.conditioning import ConditionValues
from .prompts import prompts_from, read_prompts
from .registry import default_prompts, is_pipeline_reference, load_model, model_name, resolve_checkpoint, resolve_device
from .schedule import ScaleSchedule, downsample
from .student import read_student_record, schedule_of, upsample_mode_of
from .timing import synchronize
from .viz import save_grid, save_strip, side_by_side

SAMPLER_FILE = "sampler.json"


def resolve_sampler(config: Config, name: str, mode: str | None = None, guidance: float | None = None,
                    guidance_interval: Sequence[float] | None = None) -> Sampler:
    """How to sample the model ``name``.

    A distilled student (``student.json`` / ``swd_lora.json``) defaults to mode "student": the
    schedule and upsampling of its record, with its guidance (1.0 unless it embeds guidance). Any other model
    defaults to the teacher sampler with ``teacher.guidance``; "scalewise" runs the config's
    ``schedule`` section.
    """
    record = None if is_pipeline_reference(name) else read_student_record(resolve_checkpoint(name))
    if mode is None:
        mode = "student" if record else "teacher"
    upsample_mode = config.schedule.upsample_mode
    if mode == "student":
        if record is None:
            raise ValueError(f"mode 'student' needs a distilled checkpoint (with student.json); {name} is not one")
        mode, schedule, upsample_mode = "scalewise", schedule_of(record), upsample_mode_of(record)
    else:
        schedule = ScaleSchedule.from_config(config.schedule)
    default = float(record["guidance"]) if record else config.teacher.guidance
    return Sampler(mode, schedule, default if guidance is None else float(guidance), config.teacher.steps, config.teacher.shift,
                   upsample_mode, None if guidance_interval is None else tuple(guidance_interval))


def sampling_workload(checkpoint: str, images: int, mode: str | None = None, text: bool = False, seed: int = 0,
                      config_path: str | None = None):
    """``(sampler, model, values, run)`` for timing ``checkpoint``: ``run()`` samples ``images``
    images (the model's default prompts when ``text``) the way :func:`resolve_sampler` decides
    (``config_path``: the config whose ``schedule`` mode "scalewise" runs)."""
    config = load_config(config_path, [f"checkpoint={checkpoint}"])
    sampler = resolve_sampler(config, checkpoint, mode)
    model = load_model(checkpoint, config.model, resolve_device(config.device))
    values = condition_values_for(model, images, prompts=default_prompts(checkpoint) if text else None)
    return sampler, model, values, lambda: sampler(model, values, torch.Generator().manual_seed(seed))


def interval_record(sampler: Sampler) -> dict:
    """``guidance_interval`` of a record, only where one limits the guidance (records stay as they were otherwise)."""
    return {} if sampler.guidance_interval is None else {"guidance_interval": list(sampler.guidance_interval)}


def sampler_record(sampler: Sampler) -> dict:
    return {"mode": sampler.mode, "steps": sampler.steps, "guidance": sampler.guidance, **interval_record(sampler), "nfe": sampler.nfe,
            "schedule": {"sizes": [list(s) for s in sampler.schedule.sizes], "sigmas": list(sampler.schedule.sigmas),
                         "upsample_mode": sampler.upsample_mode}}


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
    check_compile_backend(cfg.compile)  # before a (possibly large) model is loaded
    name = model_name(config)
    model = compile_for_sampling(load_model(name, config.model, resolve_device(config.device)), cfg.compile)
    sampler = resolve_sampler(config, name, cfg.mode, cfg.guidance, cfg.guidance_interval)
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


# ----------------------------------------------------------------------------- swd eval

Scorer = Callable[[torch.Tensor, ConditionValues], dict]
"""An extra measurement for ``swd eval`` (the hook for scorers beyond FID / CLIP / precision-recall):
called with the generated images (N, C, H, W) in [-1, 1] and their labels or prompts, it returns
entries to add to the eval record (numbers, or None where it cannot measure)."""

PROMPTS_HELP = "eval.prompts=FILE (a .txt, one prompt per line, or a .csv with a caption or prompt column)"


@dataclass(frozen=True)
class Scoring:
    """What ``swd eval`` scores against, resolved before any image is sampled (bad input fails fast)."""

    reference: FIDReference  # real-image statistics (and features, unless from an .npz)
    inception: InceptionV3Features  # loaded once for the reference and the generated images
    prompts: Optional[list[str]]  # text models: image i gets prompts[i % len]; None for class models
    clip: Optional[CLIPScorer]  # text models with eval.clip


def prepare_scoring(model: Denoiser, cfg: EvalConfig, device: torch.device, prompts: Optional[Sequence[str]] = None) -> Scoring:
    """Prompts (``eval.prompts``, else the caller's ``prompts``), the FID reference (``eval.reference``;
    class models default to the Fashion-MNIST test set) and the CLIP model (``eval.clip``)."""
    text = model.num_classes is None
    if text and not cfg.prompts and not prompts:
        raise ValueError(f"this model is text-conditioned: set {PROMPTS_HELP}")
    if text and not cfg.reference:
        raise ValueError(f"a text-conditioned model has no default FID reference: set {REFERENCE_HELP}")
    if not text and (cfg.clip or cfg.prompts):
        raise ValueError("eval.prompts and eval.clip are for text-conditioned models; this model is class-conditional: drop them")
    prompt_list = None
    if text:
        prompt_list = read_prompts(cfg.prompts, "eval.prompts") if cfg.prompts else list(prompts)
    clip = CLIPScorer(cfg.clip, device) if cfg.clip else None
    inception = InceptionV3Features()
    options = dict(batch_size=cfg.fid_batch_size, device=device, feature=inception)
    if cfg.reference:
        reference = load_reference(cfg.reference, cfg.resolution, **options)
    else:
        reference = reference_for_fashion_mnist(num_images=cfg.reference_images, resolution=cfg.resolution, **options)
    if reference.features is not None:
        check_set_sizes(min(len(reference.features), cfg.num_samples), cfg.num_samples, cfg.pr_k)
    return Scoring(reference, inception, prompt_list, clip)


def diversity(features: torch.Tensor, reference: FIDReference, k: int) -> dict:
    """Precision, recall, density and coverage of generated ``features`` (N, 2048) against the
    reference's features; None for each (and a note) when the reference has only statistics."""
    if reference.features is None:
        return {**dict.fromkeys(PRDC_KEYS), "note": "precision / recall / density / coverage need reference images; "
                "an .npz reference holds only mu / sigma: set eval.reference=DIR to measure them"}
    return {name: round(value, 4) for name, value in precision_recall(reference.features, features, k).items()}


def quality(images: torch.Tensor, values: ConditionValues, cfg: EvalConfig, device: torch.device, scoring: Scoring) -> dict:
    """FID against ``scoring.reference``, class accuracy (labels) or CLIP score (prompts; None
    without eval.clip), then precision / recall / density / coverage of ``images`` (N, C, H, W)."""
    features = inception_features(resize_images(images, cfg.resolution), "generated images", cfg.fid_batch_size, device,
                                  feature=scoring.inception)  # (N, 2048)
    scores = {"fid": fid_from_features(features, scoring.reference)}
    if isinstance(values, torch.Tensor):
        classifier = load_classifier(cfg.classifier or default_classifier_dir()).to(device)
        scores["class_accuracy"] = round(float(class_accuracy(classifier, images.to(device), values.to(device))), 4)
    else:
        clip = scoring.clip.score(images, values, cfg.fid_batch_size) if scoring.clip else None
        scores["clip_score"] = None if clip is None else round(clip, 4)
    return {**scores, **diversity(features, scoring.reference, cfg.pr_k)}


def measure(model: Denoiser, sampler: Sampler, config: Config, name: str, callback=None,
            prompts: Optional[Sequence[str]] = None, scorers: Sequence[Scorer] = (),
            scoring: Optional[Scoring] = None) -> tuple[dict, torch.Tensor]:
    """Sample ``eval.num_samples`` images (classes in turn, or the prompts in turn) and measure them.

    ``prompts`` are the default of text models without ``eval.prompts``; each of ``scorers`` adds
    its entries to the record; ``scoring`` (from :func:`prepare_scoring`) lets several rows share one
    Inception network and reference. Returns (record, images).
    """
    cfg = config.eval
    device = resolve_device(config.device)
    scoring = scoring or prepare_scoring(model, cfg, device, prompts)
    values = condition_values_for(model, cfg.num_samples, prompts=scoring.prompts)
    images, seconds = generate_many(model, sampler, values, cfg.seed, cfg.batch_size, first_batch_callback=callback)
    record = {"name": name, "mode": sampler.mode, "steps": sampler.steps, "guidance": sampler.guidance, **interval_record(sampler),
              "nfe": sampler.nfe, **quality(images, values, cfg, device, scoring), "seconds_per_image": seconds / len(values),
              "num_samples": len(values)}
    if scoring.prompts is not None:
        record["num_prompts"] = len(scoring.prompts)
    for scorer in scorers:
        record.update(scorer(images, values))
    print(summary_line(record))
    return record, images


def configured_scorers(cfg: EvalConfig) -> list[Scorer]:
    """The scorers ``eval.*`` asks for: the Twemoji prompt-alignment scorer (``eval.twemoji_scorer``)."""
    if not cfg.twemoji_scorer:
        return []
    scorer = load_scorer(None if cfg.twemoji_scorer == "shipped" else cfg.twemoji_scorer)

    def twemoji(images: torch.Tensor, prompts: ConditionValues) -> dict:
        if isinstance(prompts, torch.Tensor):
            raise ValueError("eval.twemoji_scorer scores text prompts; this model is class-conditional: drop it")
        scores = scorer.score(downsample(images.float(), 32) if images.shape[-1] > 32 else images, list(prompts), seed=cfg.seed)
        return {k: round(v, 4) for k, v in scores.items()}

    return [twemoji]


def run_eval(config: Config, name: str | None = None, prompts: Optional[Sequence[str]] = None, scorers: Sequence[Scorer] = ()) -> dict:
    """FID, precision / recall / density / coverage, class accuracy or CLIP score, seconds per image
    (see :func:`measure` for ``prompts`` and ``scorers``); writes eval.json and a grid."""
    checkpoint = model_name(config)
    device = resolve_device(config.device)
    model = load_model(checkpoint, config.model, device)
    sampler = resolve_sampler(config, checkpoint, config.eval.mode, config.eval.guidance, config.eval.guidance_interval)
    scorers = [*scorers, *configured_scorers(config.eval)]
    if prompts is None and model.num_classes is None and not config.eval.prompts:
        prompts = default_prompts(checkpoint)  # a text model's own prompts.txt, if it ships one
    record, images = measure(model, sampler, config, name or sampler.mode, prompts=prompts, scorers=scorers)
    cfg = config.eval
    record["fid"] = round(record["fid"], 3)
    if cfg.reference is None:
        record["reference_images"] = cfg.reference_images
    else:
        record["reference"] = cfg.reference
    if cfg.reference is not None or cfg.resolution is not None:
        record["resolution"] = cfg.resolution
    record.update(checkpoint=checkpoint, device=str(device))
    out = Path(config.output_dir)
    _write_run(config, out, sampler)
    save_grid(images[:100], out / f"{record['name']}_grid.png", nrow=10)
    (out / "eval.json").write_text(json.dumps(record, indent=1))
    return record


def summary_line(record: dict) -> str:
    """FID, then class accuracy (class models) or CLIP score (if measured), precision and recall
    and the Twemoji scores (text models), then ms / image, NFE and n."""
    parts = [f"{record['name']}: FID {record['fid']:.2f}"]
    if "class_accuracy" in record:
        parts.append(f"class accuracy {100 * record['class_accuracy']:.1f}%")
    else:
        if record.get("clip_score") is not None:
            parts.append(f"CLIP {record['clip_score']:.2f}")
        parts += [f"{key} {'n/a' if record[key] is None else format(record[key], '.3f')}" for key in ("precision", "recall")]
        if "subcategory_accuracy" in record:  # the Twemoji scorer
            parts += [f"subcategory {100 * record['subcategory_accuracy']:.1f}%", f"retrieval top-1 {100 * record['retrieval_top1']:.1f}%"]
    parts += [f"{record['seconds_per_image'] * 1000:.1f} ms/image", f"{record['nfe']} NFE", f"n={record['num_samples']}"]
    return " | ".join(parts)


def run_demo(config: Config) -> list[Path]:
    """Distil the shipped teacher for ``distill.steps`` generator updates, then compare three samplers.

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
    models = [load_model(checkpoint, config.model, device) for _, checkpoint, _, _ in specs]
    scoring = prepare_scoring(models[0], config.eval, device)  # one Inception and reference for every row
    records, grids, captions, strip = [], [], [], None
    for (name, checkpoint, mode, caption), model in zip(specs, models):
        sampler = resolve_sampler(config, checkpoint, mode)
        steps: list[torch.Tensor] = []
        callback = (lambda info: steps.append(info["denoised"].cpu())) if name == "swd-student" else None
        record, images = measure(model, sampler, config, name, callback, scoring=scoring)
        record["fid"] = round(record["fid"], 2)
        records.append({k: record[k] for k in ("name", "steps", "guidance", "nfe", "fid", "class_accuracy", "precision", "recall",
                                               "seconds_per_image", "num_samples")})
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
    lines = ["| sampler | steps | network evals / image | FID | class accuracy | precision | recall | ms / image |",
             "|---|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['name']} | {r['steps']} | {r['nfe']} | {r['fid']:.2f} | {100 * r['class_accuracy']:.1f}% | {r['precision']:.3f} | "
                     f"{r['recall']:.3f} | {1000 * r['seconds_per_image']:.1f} |")
    return "\n".join(lines)

"""Saving and loading a distilled student.

``OUTPUT_DIR/student``: a merged model directory (like any swd model: transformer/, conditioner,
model.yaml) plus ``student.json`` with the schedule it was distilled for; ``swd sample`` and
``swd eval`` take it as ``checkpoint=``.
``OUTPUT_DIR/student_lora`` (LoRA students): the adapter in the diffusers/peft LoRA format
(``pytorch_lora_weights.safetensors``) plus ``swd_lora.json`` naming the teacher it applies to.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..config import Config, save_config
from ..models import Denoiser, save_denoiser
from ..schedule import ScaleSchedule
from .models import CRITIC, STUDENT, DistillModels

STUDENT_FILE = "student.json"
LORA_FILE = "swd_lora.json"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' name for a LoRA in safetensors


def student_guidance(model: Denoiser) -> float:
    """The guidance a student samples with: none (1.0) for classifier-free guidance, since it was
    distilled from the guided teacher; for a guidance-embedding model (FLUX.1-dev) the embedding
    it was trained with."""
    return float(model.guidance) if getattr(model, "embeds_guidance", False) else 1.0


def student_record(config: Config, schedule: ScaleSchedule, teacher: str, step: int, guidance: float = 1.0) -> dict:
    return {
        "schedule": {"sizes": [list(s) for s in schedule.sizes], "sigmas": list(schedule.sigmas)},
        "mode": config.distill.mode,
        "guidance": guidance,
        "teacher": teacher,
        "step": step,
    }


def export_student(models: DistillModels, config: Config, schedule: ScaleSchedule, teacher: str, out: Path, step: int) -> Path:
    """Write ``out/student`` (merged) and ``out/student_lora`` (LoRA students).

    A LoRA student is merged into a copy of the base, so training can go on afterwards.
    """
    record = student_record(config, schedule, teacher, step, student_guidance(models.student.denoiser))
    student = models.student.denoiser
    if models.student.adapter is not None:
        lora_dir = out / "student_lora"
        student.transformer.save_lora_adapter(str(lora_dir), adapter_name=STUDENT)
        # how to load the teacher again (dtype, variant, revision of a pipeline teacher)
        (lora_dir / LORA_FILE).write_text(json.dumps({**record, "adapter": STUDENT, "model": vars(config.model)}, indent=1))
        if config.model.kind == "diffusers":
            return lora_dir  # a merged copy of a pipeline teacher would be a second multi-GB model: the LoRA is the export
        student = merged_copy(models.base)
    directory = save_denoiser(student, out / "student", config.model)
    (directory / STUDENT_FILE).write_text(json.dumps(record, indent=1))
    save_config(config, directory / "config.yaml")
    return directory


def merged_copy(base: Denoiser) -> Denoiser:
    """A plain Denoiser with the student adapter fused into the weights (the base is untouched)."""
    import copy

    merged = copy.deepcopy(base)
    transformer = merged.transformer
    transformer.enable_adapters()
    transformer.set_adapter(STUDENT)
    if CRITIC in transformer.peft_config:
        transformer.delete_adapters(CRITIC)
    transformer.fuse_lora(adapter_names=[STUDENT])
    transformer.unload_lora()
    return merged.requires_grad_(False)


def read_student_record(directory: str | Path) -> dict | None:
    """``student.json`` (or ``swd_lora.json``) of a distilled model directory, None for a teacher."""
    for name in (STUDENT_FILE, LORA_FILE):
        path = Path(directory) / name
        if path.is_file():
            return json.loads(path.read_text())
    return None


def load_student_lora(directory: str | Path) -> Denoiser:
    """The teacher named in ``swd_lora.json`` with the LoRA of ``directory`` applied."""
    from ..commands import BUILTIN_MODELS, is_pipeline_reference, load_reference
    from ..config import ModelConfig, _from_dict

    directory = Path(directory)
    record = json.loads((directory / LORA_FILE).read_text())
    teacher = record["teacher"]
    if not is_pipeline_reference(teacher) and teacher not in BUILTIN_MODELS and not Path(teacher).exists():
        raise FileNotFoundError(f"{directory / LORA_FILE} names the teacher {teacher!r}, which does not exist; edit its 'teacher' entry")
    model_cfg = _from_dict(ModelConfig, record["model"]) if "model" in record else None
    model, _ = load_reference(teacher, model_cfg)
    from ..pipeline import load_lora  # checks that every key matches a module (diffusers only warns)

    load_lora(model.transformer, directory, adapter_name=STUDENT)
    return model.requires_grad_(False).eval()


def schedule_of(record: dict) -> ScaleSchedule:
    return ScaleSchedule([tuple(s) for s in record["schedule"]["sizes"]], record["schedule"]["sigmas"])

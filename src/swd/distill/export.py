"""Writing a distilled student (its on-disk layout is :mod:`swd.student`).

``OUTPUT_DIR/student``: a merged model directory plus ``student.json``; ``OUTPUT_DIR/student_lora``
(LoRA students): the adapter in diffusers' LoRA format plus ``swd_lora.json``.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

from ..config import Config, save_config
from ..models import Denoiser, save_denoiser
from ..registry import PROMPTS_FILE, prompts_file
from ..schedule import ScaleSchedule
from ..student import CRITIC, LORA_FILE, STUDENT, STUDENT_FILE, student_record
from .views import DistillModels


def student_guidance(model: Denoiser) -> float:
    """The guidance a student samples with: none (1.0) for classifier-free guidance, since it was
    distilled from the guided teacher; for a guidance-embedding model (FLUX.1-dev) the embedding
    it was trained with."""
    return float(model.guidance) if getattr(model, "embeds_guidance", False) else 1.0


def export_student(models: DistillModels, config: Config, schedule: ScaleSchedule, teacher: str, out: Path, step: int) -> Path:
    """Write ``out/student`` (merged) and ``out/student_lora`` (LoRA students); ``config.model``
    is the teacher's resolved model config.

    A LoRA student is merged into a copy of the base, so training can go on afterwards.
    """
    record = student_record(schedule, config.distill.mode, teacher, step, student_guidance(models.student.denoiser),
                            config.schedule.upsample_mode)
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
    prompts = prompts_file(teacher)
    if prompts is not None:  # the teacher's default evaluation prompts are the student's too
        shutil.copyfile(prompts, directory / PROMPTS_FILE)
    save_config(config, directory / "config.yaml")
    return directory


def merged_copy(base: Denoiser) -> Denoiser:
    """A plain Denoiser with the student adapter fused into the weights (the base is untouched)."""
    merged = copy.deepcopy(base)
    transformer = merged.transformer
    transformer.enable_adapters()
    transformer.set_adapter(STUDENT)
    if CRITIC in transformer.peft_config:
        transformer.delete_adapters(CRITIC)
    transformer.fuse_lora(adapter_names=[STUDENT])
    transformer.unload_lora()
    return merged.requires_grad_(False)

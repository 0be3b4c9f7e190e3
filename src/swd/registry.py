"""Models by name: the built-in ones, swd model directories, diffusers pipelines (directory or hub
id) and distilled students (merged, or a LoRA over the teacher it names).

Every command resolves ``checkpoint=`` / ``distill.teacher=`` / ``model.pretrained=`` here.
"""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import PartialState

from .config import Config, ModelConfig, from_dict, is_hub_id
from .models import Denoiser, load_denoiser
from .models.pipeline_teachers import load_pipeline_codec, load_pipeline_denoiser
from .prompts import read_prompts
from .student import LORA_FILE, STUDENT, is_student_lora, load_lora, read_student_record

ASSETS = Path(__file__).parent / "assets"
BUILTIN_MODELS = {"teacher": ASSETS / "teacher", "twemoji-teacher": ASSETS / "twemoji_teacher"}
PROMPTS_FILE = "prompts.txt"  # in a text model's directory: its default evaluation prompts (a sample of its training captions)


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
    return name not in BUILTIN_MODELS and is_hub_id(name)


def load_reference(name: str, model_cfg: ModelConfig | None = None) -> tuple[Denoiser, ModelConfig]:
    """A teacher by name: "teacher", an swd model directory, or a diffusers SD3 / FLUX pipeline
    (local directory or hub id, loaded with ``model_cfg``'s dtype, variant and revision).
    Returns the model and the ModelConfig that loads it again."""
    if is_pipeline_reference(name):
        return load_pipeline_denoiser(name, model_cfg)
    return load_denoiser(resolve_checkpoint(name))


def load_model_space(name: str, model_cfg: ModelConfig | None = None) -> Denoiser:
    """What a model's data space needs and no more: the built-in models whole (they are small); for
    a pipeline, its VAE and its transformer's geometry without weights (``load_pipeline_codec``)."""
    if is_pipeline_reference(name):
        return load_pipeline_codec(name, model_cfg)
    return load_reference(name, model_cfg)[0].requires_grad_(False).eval()


def teacher_reference(name: str) -> str:
    """How an exported student names its teacher: a built-in name or a hub id stays as it is
    (valid in any installation), a directory becomes an absolute path."""
    path = Path(name)
    return str(path.resolve()) if name not in BUILTIN_MODELS and path.exists() else name


def load_student_lora(directory: str | Path) -> Denoiser:
    """The teacher named in ``swd_lora.json`` with the LoRA of ``directory`` applied."""
    directory = Path(directory)
    record = read_student_record(directory)
    teacher = record["teacher"]
    if not is_pipeline_reference(teacher) and teacher not in BUILTIN_MODELS and not Path(teacher).exists():
        raise FileNotFoundError(f"{directory / LORA_FILE} names the teacher {teacher!r}, which does not exist; edit its 'teacher' entry")
    model_cfg = from_dict(ModelConfig, record["model"]) if "model" in record else None
    model, _ = load_reference(teacher, model_cfg)
    load_lora(model.transformer, directory, adapter_name=STUDENT)
    return model.requires_grad_(False).eval()


def prompts_file(name: str) -> Path | None:
    """The default evaluation prompts of model ``name``: ``prompts.txt`` in its directory, or in the
    directory of the teacher a student LoRA names; None when there is none (or for pipelines)."""
    if is_pipeline_reference(name):
        return None
    directory = resolve_checkpoint(name)
    if is_student_lora(directory):
        teacher = read_student_record(directory)["teacher"]
        return None if is_pipeline_reference(teacher) else prompts_file(teacher)
    path = directory / PROMPTS_FILE
    return path if path.is_file() else None


def default_prompts(name: str) -> list[str] | None:
    path = prompts_file(name)
    return None if path is None else read_prompts(path, f"{path} (the model's default eval.prompts)")


def resolve_device(name: str | None) -> torch.device:
    """``device=`` of a config, or what accelerate picks (a GPU when there is one)."""
    return torch.device(name) if name else PartialState().device


def model_name(config: Config) -> str:
    """The model a sample / eval / make-data command runs: ``checkpoint`` or ``model.pretrained``."""
    name = config.checkpoint or config.model.pretrained
    if not name:
        raise ValueError("no model given: set checkpoint=DIR (a model directory), checkpoint=teacher (the shipped teacher) "
                         "or model.pretrained=PIPELINE (a diffusers SD3 / FLUX directory or hub id)")
    return name


def load_model(name: str, model_cfg: ModelConfig, device: torch.device) -> Denoiser:
    """A model directory, a distilled student (merged), a student LoRA directory or a diffusers
    pipeline, on ``device`` in eval mode."""
    if not is_pipeline_reference(name) and is_student_lora(resolve_checkpoint(name)):
        model = load_student_lora(resolve_checkpoint(name))
    else:
        model, _ = load_reference(name, model_cfg)
    return model.to(device).eval()

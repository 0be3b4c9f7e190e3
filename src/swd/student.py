"""The distilled student on disk: its record, its LoRA files and its schedule.

``swd distill`` writes two things (see :mod:`swd.distill.export`):

- ``OUTPUT_DIR/student``: a merged model directory (like any swd model: transformer/, conditioner,
  model.yaml) plus ``student.json``, the record: the schedule it was distilled for, its mode,
  guidance, teacher and step;
- ``OUTPUT_DIR/student_lora`` (LoRA students): the adapter in diffusers' LoRA format
  (``pytorch_lora_weights.safetensors``) plus ``swd_lora.json``: the same record with the model
  config that loads the teacher again.

:func:`load_lora` also reads peft's ``PeftModel.save_pretrained`` layout over the transformer
(``adapter_config.json`` + ``adapter_model.safetensors``, the authors' published format).
Which teacher a LoRA applies to, and loading it, is :mod:`swd.registry`'s business.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import torch
from peft import LoraConfig
from safetensors import safe_open
from safetensors.torch import load_file

from .schedule import ScaleSchedule

STUDENT = "student"  # adapter names on the shared transformer
CRITIC = "critic"

STUDENT_FILE = "student.json"  # the record beside a merged student
LORA_FILE = "swd_lora.json"  # the record beside a student LoRA
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' name for a LoRA in safetensors
PEFT_CONFIG = "adapter_config.json"  # peft's PeftModel.save_pretrained layout
PEFT_WEIGHTS = "adapter_model.safetensors"
LORA_PREFIXES = ("base_model.model.", "transformer.")  # PeftModel's prefix; a pipeline-level LoRA's prefix
LORA_METADATA_KEY = "lora_adapter_metadata"  # where diffusers' save_lora_adapter keeps the LoraConfig


# --- the record -------------------------------------------------------------------------------
def student_record(schedule: ScaleSchedule, mode: str, teacher: str, step: int, guidance: float = 1.0,
                   upsample_mode: str = "bicubic") -> dict:
    """What a student needs to be sampled as it was trained (the upsampling between its stages included)."""
    return {
        "schedule": {"sizes": [list(s) for s in schedule.sizes], "sigmas": list(schedule.sigmas), "upsample_mode": upsample_mode},
        "mode": mode,
        "guidance": guidance,
        "teacher": teacher,
        "step": step,
    }


def read_student_record(directory: str | Path) -> dict | None:
    """``student.json`` (or ``swd_lora.json``) of a distilled model directory, None for a teacher."""
    for name in (STUDENT_FILE, LORA_FILE):
        path = Path(directory) / name
        if path.is_file():
            return json.loads(path.read_text())
    return None


def schedule_of(record: dict) -> ScaleSchedule:
    """The schedule a student was distilled for."""
    return ScaleSchedule([tuple(s) for s in record["schedule"]["sizes"]], record["schedule"]["sigmas"])


def upsample_mode_of(record: dict) -> str:
    """How a student upsamples between its stages (records written before the mode was recorded:
    bicubic, the default they were trained with)."""
    return record["schedule"].get("upsample_mode", "bicubic")


def is_student_lora(directory: str | Path) -> bool:
    return (Path(directory) / LORA_FILE).is_file()


# --- LoRA files -------------------------------------------------------------------------------
def read_lora(path: str | Path) -> tuple[dict[str, torch.Tensor], Optional[dict], Optional[dict]]:
    """A LoRA directory -> (state dict keyed by transformer module paths, LoraConfig kwargs, swd record).

    The LoraConfig kwargs are None when the file carries none (diffusers then infers rank and alpha
    from the weights); the record is ``swd_lora.json`` (schedule, teacher, model config) or None.
    """
    directory = Path(path)
    if not directory.exists():
        raise FileNotFoundError(f"LoRA directory {directory} does not exist")
    if (directory / LORA_WEIGHTS).is_file():  # swd distill / diffusers save_lora_adapter
        weights = directory / LORA_WEIGHTS
        with safe_open(str(weights), framework="pt") as f:
            header = f.metadata() or {}
        config = json.loads(header[LORA_METADATA_KEY]) if LORA_METADATA_KEY in header else None
        record_path = directory / LORA_FILE
        record = json.loads(record_path.read_text()) if record_path.is_file() else None
    elif (directory / PEFT_CONFIG).is_file() and (directory / PEFT_WEIGHTS).is_file():  # PeftModel.save_pretrained
        peft_type = json.loads((directory / PEFT_CONFIG).read_text()).get("peft_type")
        if peft_type != "LORA":
            raise ValueError(f"{directory / PEFT_CONFIG} describes a {peft_type} adapter; only LoRA adapters are supported")
        weights = directory / PEFT_WEIGHTS
        config = LoraConfig.from_pretrained(str(directory)).to_dict()
        record = None
    else:
        raise FileNotFoundError(
            f"{directory} holds no LoRA: expected {LORA_WEIGHTS} (written by `swd distill`, with {LORA_FILE}) "
            f"or {PEFT_CONFIG} + {PEFT_WEIGHTS} (peft's PeftModel.save_pretrained over the transformer)"
        )
    state = load_file(str(weights))
    for prefix in LORA_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k.removeprefix(prefix): v for k, v in state.items()}
    return state, config, record


def unmatched_lora_keys(transformer: torch.nn.Module, keys: Sequence[str]) -> list[str]:
    """Keys that are no LoRA weight of a module of ``transformer`` (``<module path>.lora_*``)."""
    modules = dict(transformer.named_modules())
    return sorted(k for k in keys if ".lora_" not in k or k.split(".lora_")[0] not in modules)


def load_lora(transformer, path: str | Path, adapter_name: str = STUDENT) -> Optional[dict]:
    """Load the LoRA in ``path`` (either layout) into a diffusers transformer and activate it.

    Every key must name a module of the transformer: an adapter for another model would otherwise
    load partly or not at all, silently (diffusers only warns). Returns the ``swd_lora.json``
    record (None without one).
    """
    state, config, record = read_lora(path)
    if not state:
        raise ValueError(f"the LoRA in {path} has no weights")
    bad = unmatched_lora_keys(transformer, list(state))
    if bad:
        shown = ", ".join(bad[:20]) + (f", ... ({len(bad) - 20} more)" if len(bad) > 20 else "")
        raise ValueError(
            f"{len(bad)} of {len(state)} keys in the LoRA {path} match no module of the {type(transformer).__name__}: "
            f"{shown}. Is it an adapter for another model?"
        )
    transformer.load_lora_adapter(state, prefix=None, adapter_name=adapter_name, metadata=config)
    transformer.enable_adapters()
    transformer.set_adapter(adapter_name)
    return record

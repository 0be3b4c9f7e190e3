"""What a distillation checkpoint holds besides the optimizers: the trainable tensors only (both
adapters, or the student copy, and the GAN head), by stable names. The frozen base is not written."""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file

from .views import DistillModels

TRAINABLE_FILE = "trainable.safetensors"


def _named_trainable(view, prefix: str) -> dict[str, torch.nn.Parameter]:
    ids = {id(p) for p in view.trainable_parameters()}
    return {f"{prefix}.{n}": p for n, p in view.named_parameters() if id(p) in ids}


def trainable_parameters_by_name(models: DistillModels) -> dict[str, torch.nn.Parameter]:
    """Every trainable tensor by a stable name: student adapter (or copy), critic adapter, head."""
    named = _named_trainable(models.student, "student")
    if models.critic is not None:
        named.update(_named_trainable(models.critic, "critic"))
    return named


def trainable_state(models: DistillModels) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in trainable_parameters_by_name(models).items()}


def load_trainable_state(models: DistillModels, state: dict[str, torch.Tensor]) -> None:
    current = trainable_parameters_by_name(models)
    missing, unexpected = sorted(set(current) - set(state)), sorted(set(state) - set(current))
    if missing or unexpected:
        raise ValueError(f"checkpoint weights do not match this run's models (another distill config?): missing {missing[:5]}, unexpected {unexpected[:5]}")
    with torch.no_grad():
        for name, value in state.items():
            current[name].copy_(value)


def register_state_hooks(accelerator: Accelerator, models: DistillModels) -> None:
    """Checkpoints hold only the trainable tensors (accelerate's documented save/load hooks)."""

    def save_hook(_models, weights, output_dir):
        if accelerator.is_main_process:
            save_file(trainable_state(models), str(Path(output_dir) / TRAINABLE_FILE))
        weights.clear()

    def load_hook(loaded_models, input_dir):
        path = Path(input_dir) / TRAINABLE_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: {input_dir} is not a swd distill checkpoint")
        load_trainable_state(models, load_file(str(path)))
        loaded_models.clear()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)

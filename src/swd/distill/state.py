"""What a distillation checkpoint holds besides the optimizers: the trainable tensors only (both
adapters, or the student copy, and the GAN head), by stable names. The frozen base is not written.

Under FSDP the trainable tensors are shards (DTensors): they are gathered whole for saving and
split again on loading, and the optimizers, which accelerate does not hold then, are written here
too, by the same names (``optimizer_state.safetensors``). Either file is the same for any number
of processes.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from torch.distributed.tensor import DTensor, distribute_tensor

from .ema import StudentEMA, split_state
from .views import DistillModels

TRAINABLE_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer_state.safetensors"


def _named_trainable(view, prefix: str) -> dict[str, torch.nn.Parameter]:
    ids = {id(p) for p in view.trainable_parameters()}
    return {f"{prefix}.{n}": p for n, p in view.named_parameters() if id(p) in ids}


def trainable_parameters_by_name(models: DistillModels) -> dict[str, torch.nn.Parameter]:
    """Every trainable tensor by a stable name: student adapter (or copy), critic adapter, head."""
    named = _named_trainable(models.student, "student")
    if models.critic is not None:
        named.update(_named_trainable(models.critic, "critic"))
    return named


def whole(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself, or the full tensor of a shard (a collective: every process calls it, in the same order)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A whole ``value`` placed as ``param`` is: on its device, sharded like it if it is a shard."""
    if isinstance(param, DTensor):
        return distribute_tensor(value.to(param.device_mesh.device_type), param.device_mesh, param.placements, src_data_rank=None)
    return value.to(param.device)


def trainable_state(models: DistillModels) -> dict[str, torch.Tensor]:
    return {k: whole(v.detach()).contiguous().cpu() for k, v in trainable_parameters_by_name(models).items()}


def load_trainable_state(models: DistillModels, state: dict[str, torch.Tensor]) -> None:
    current = trainable_parameters_by_name(models)
    missing, unexpected = sorted(set(current) - set(state)), sorted(set(state) - set(current))
    if missing or unexpected:
        raise ValueError(f"checkpoint weights do not match this run's models (another distill config?): missing {missing[:5]}, unexpected {unexpected[:5]}")
    with torch.no_grad():
        for name, value in state.items():
            current[name].copy_(like(value, current[name]))


def optimizer_state(optimizers: dict[str, torch.optim.Optimizer | None], named: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    """``{"<optimizer>.<parameter>.<key>": whole tensor}``: each optimizer's per-parameter state
    (AdamW: step, exp_avg, exp_avg_sq) by the parameters' stable names."""
    names = {id(p): n for n, p in named.items()}
    out = {}
    for opt_name, opt in optimizers.items():
        if opt is None:
            continue
        for group in opt.param_groups:
            for p in group["params"]:
                for key, value in opt.state.get(p, {}).items():
                    out[f"{opt_name}.{names[id(p)]}.{key}"] = whole(value.detach()).contiguous().cpu()
    return out


def load_optimizer_state(optimizers: dict[str, torch.optim.Optimizer | None], named: dict[str, torch.nn.Parameter], state: dict[str, torch.Tensor]) -> None:
    """Put :func:`optimizer_state`'s tensors back (a shard of each for sharded parameters; scalars
    such as AdamW's step stay where the optimizer keeps them, on the CPU)."""
    by_param: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, value in state.items():
        prefix, entry = key.rsplit(".", 1)
        by_param[prefix][entry] = value
    names = {id(p): n for n, p in named.items()}
    known = set()
    for opt_name, opt in optimizers.items():
        if opt is None:
            continue
        for group in opt.param_groups:
            for p in group["params"]:
                key = f"{opt_name}.{names[id(p)]}"
                known.add(key)
                entries = by_param.get(key)
                if entries:
                    opt.state[p] = {k: v if v.dim() == 0 else like(v, p) for k, v in entries.items()}
    unexpected = sorted(set(by_param) - known)
    if unexpected:
        raise ValueError(f"the checkpoint's optimizer state names parameters this run does not train: {unexpected[:5]}")


def register_state_hooks(accelerator: Accelerator, models: DistillModels, optimizers: dict[str, torch.optim.Optimizer | None] | None = None,
                         ema: StudentEMA | None = None) -> None:
    """Checkpoints hold only the trainable tensors (accelerate's documented save/load hooks), the
    student's average when there is one, and, when given, the state of ``optimizers`` that accelerate
    does not hold (FSDP's)."""

    def save_hook(_models, weights, output_dir):
        state = trainable_state(models)  # on every process: sharded tensors are gathered together
        if ema is not None:
            state.update(ema.state())
        opt_state = optimizer_state(optimizers, trainable_parameters_by_name(models)) if optimizers is not None else None
        if accelerator.is_main_process:
            save_file(state, str(Path(output_dir) / TRAINABLE_FILE))
            if opt_state is not None:
                save_file(opt_state, str(Path(output_dir) / OPTIMIZER_FILE))
        weights.clear()

    def load_hook(loaded_models, input_dir):
        path = Path(input_dir) / TRAINABLE_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: {input_dir} is not a swd distill checkpoint")
        state, averaged = split_state(load_file(str(path)))
        load_trainable_state(models, state)
        if ema is not None:
            ema.load(averaged)
        elif averaged:
            raise ValueError(f"{path} holds a student average (distill.ema_decay) that this run's config does not ask for")
        if optimizers is not None:
            opt_path = Path(input_dir) / OPTIMIZER_FILE
            if not opt_path.is_file():
                raise FileNotFoundError(f"{opt_path} is missing: {input_dir} was not written with distill.distributed=fsdp")
            load_optimizer_state(optimizers, trainable_parameters_by_name(models), load_file(str(opt_path)))
        loaded_models.clear()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)

"""FSDP for distillation: the student, the critic (with the GAN head), the MMD features and the
teacher as roles of ONE module, so that the frozen base they share is sharded once.

Under DDP each trainable view is wrapped on its own (:func:`swd.distill.trainer.prepare`) and every
process holds the whole base. Here :class:`DistillModule` owns the base (carrying both adapters)
and the GAN head, and ``module(role, method, *args)`` runs that view's method inside the module's
forward: FSDP gathers weights around a module's forward, so every forward of the base goes through
this one module, whichever view it is for. torch's FSDP2 (``fully_shard``) makes each transformer
block a unit (gathered while it runs, freed after, gathered again for its backward) and the module
the root unit (embedders, output layer, head). The conditioner and the codec (text encoders, VAE)
stay whole on every process: a batch is encoded outside the training forward. Gradients are
reduce-scattered as averages, like DDP's all-reduce, so N processes on the global batch make the
update of one process (tested on CPU with gloo).

Why ``fully_shard`` and not accelerate's FSDP plugin (accelerate 1.15): accelerate turns FSDP on
only for accelerator devices (on CPU processes the plugin is ignored and the run stays DDP, so the
sharded update could not be tested there), and its FSDP checkpoints pair optimizer ``i`` with
model ``i`` and write the whole model, frozen base included, at every save. accelerate still does
the rest: launching, the process group, device placement, autocast, backward, DTensor-aware
clipping, log reduction, RNG states and ``save_state`` / ``load_state``, whose hooks
(:mod:`swd.distill.state`) gather the sharded trainable tensors and optimizer states into whole ones.
"""

from __future__ import annotations

import torch
from accelerate import Accelerator
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard

from ..config import DistillConfig
from .iteration import adamw
from .state import register_state_hooks
from .views import CriticOutput, DistillModels, Roles

ROLES = ("student", "critic", "features", "teacher")
METHODS = ("forward", "features_only", "logits_only", "sample")  # what a Role calls on its view


class DistillModule(nn.Module):
    """The base (both adapters on it) and the GAN head as one module whose forward dispatches by role."""

    def __init__(self, models: DistillModels):
        super().__init__()
        self.base = models.base
        self.head = models.critic.head if models.critic is not None else None
        # a plain dict: the views hold the same base, which must be registered (and sharded) once
        self.views = {"student": models.student, "critic": models.critic, "features": models.features, "teacher": models.teacher}

    def forward(self, role: str, method: str, *args, **kwargs):
        """``views[role].<method>(*args, **kwargs)``, inside this module's forward."""
        if method not in METHODS:
            raise ValueError(f"unknown view method {method!r}; one of {METHODS}")
        view = self.views[role]
        if view is None:
            raise ValueError(f"this run has no {role} (no loss needs one)")
        out = getattr(view, method)(*args, **kwargs)
        if isinstance(out, CriticOutput):
            return CriticOutput(*(not_a_view(t) for t in out))
        return not_a_view(out)


def not_a_view(t):
    """``t``, or a copy of it when it is a view (the head's squeezed logits, the halves of one head
    call): FSDP hooks the backward of a root forward's outputs and warns on views, which an in-place
    op could detach from the hook. Nothing here changes them in place; the copy keeps the values."""
    return t.clone() if isinstance(t, torch.Tensor) and t._base is not None else t


class Role:
    """One role of a :class:`DistillModule`, called like the view it stands for."""

    def __init__(self, module: nn.Module, name: str):
        if name not in ROLES:
            raise ValueError(f"unknown role {name!r}; one of {ROLES}")
        self.module = module
        self.name = name

    def __call__(self, *args, **kwargs):
        return self.module(self.name, "forward", *args, **kwargs)

    def features_only(self, *args):
        return self.module(self.name, "features_only", *args)

    def logits_only(self, *args):
        return self.module(self.name, "logits_only", *args)

    def sample(self, *args):
        return self.module(self.name, "sample", *args)


def shard(module: DistillModule, device: torch.device, processes: int) -> None:
    """FSDP2 over the launcher's ``processes``: every transformer block its own unit, ``module`` the root.

    Each unit is moved to ``device`` as it is sharded, so no process holds the whole base there; the
    conditioner and the codec are moved whole."""
    mesh = init_device_mesh(device.type, (processes,))
    base = module.base
    kept = [child for name, child in base.named_children() if name != "transformer"]
    for child in kept:
        child.to(device)
    for block in base.blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=True)
    fully_shard(module, mesh=mesh, reshard_after_forward=True, ignored_params={p for child in kept for p in child.parameters()})


def prepare_fsdp(accelerator: Accelerator, models: DistillModels, cfg: DistillConfig) -> tuple[Roles, tuple, tuple]:
    """The FSDP counterpart of :func:`swd.distill.trainer.prepare` (after its common part): one module,
    sharded over several processes, plain optimizers over the sharded parameters (their state is
    checkpointed by :func:`swd.distill.state.register_state_hooks`)."""
    module = DistillModule(models)
    if accelerator.num_processes > 1:
        shard(module, accelerator.device, accelerator.num_processes)
        models.rebind()  # the views' parameter lists held the tensors fully_shard replaced
    else:
        module.to(accelerator.device)
    models.set_phase("generator")
    student_params = models.student.trainable_parameters()
    opt_g = adamw(student_params, cfg.optim.lr, cfg.optim)
    critic_params, opt_c = [], None
    if models.critic is not None:
        critic_params = models.critic.trainable_parameters()
        opt_c = adamw(critic_params, cfg.optim.critic_lr, cfg.optim)
    register_state_hooks(accelerator, models, {"generator": opt_g, "critic": opt_c})
    roles = Roles(Role(module, "student"), Role(module, "critic") if models.critic is not None else None, Role(module, "student"),
                  Role(module, "critic") if models.critic is not None else None, Role(module, "features"), Role(module, "teacher"))
    return roles, (opt_g, opt_c), (student_params, critic_params)


def is_sharded(models: DistillModels) -> bool:
    """Whether the base's weights exist only as shards (FSDP over several processes)."""
    return isinstance(models.base.blocks[0], FSDPModule)

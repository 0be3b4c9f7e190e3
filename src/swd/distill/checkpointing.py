"""Per-block gradient checkpointing that knows which LoRA adapter each block ran with.

The student, the critic and the teacher are one transformer with adapters switched between
forwards, and one backward can cross graphs made under different adapters (the generator loss
flows through the critic's forward back into the student's). diffusers' per-block checkpointing
recomputes a block during backward with whatever adapter is active at that moment, which is the
wrong one (torch then reports a mismatch in the recomputed tensors). Here the checkpoint records
the block's active adapter at forward time and the recomputation runs under it, through
``torch.utils.checkpoint``'s ``context_fn`` and diffusers' ``enable_gradient_checkpointing(
gradient_checkpointing_func=...)``, both public APIs.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from torch.utils.checkpoint import checkpoint

AdapterState = tuple[bool, tuple[str, ...]]  # (adapters disabled, active adapter names)


def lora_layers(module: nn.Module) -> list[BaseTunerLayer]:
    return [m for m in module.modules() if isinstance(m, BaseTunerLayer)]


def adapter_state(layers: list[BaseTunerLayer]) -> AdapterState | None:
    """What the adapter layers of one block run with now (None: the block has none)."""
    if not layers:
        return None
    return bool(layers[0].disable_adapters), tuple(layers[0].active_adapters)


def set_adapter_state(layers: list[BaseTunerLayer], state: AdapterState) -> None:
    """Switch only these layers; peft's ``set_adapter`` also flips ``requires_grad``, so every flag
    is put back (which parameters train is the trainer's decision)."""
    disabled, names = state
    flags = [(p, p.requires_grad) for layer in layers for p in layer.parameters()]
    for layer in layers:
        layer.enable_adapters(not disabled)
        if names:
            layer.set_adapter(list(names))
    for p, flag in flags:
        p.requires_grad_(flag)


@contextlib.contextmanager
def adapter_state_as(layers: list[BaseTunerLayer], state: AdapterState | None) -> Iterator[None]:
    current = adapter_state(layers)
    if state is None or state == current:
        yield
        return
    set_adapter_state(layers, state)
    try:
        yield
    finally:
        set_adapter_state(layers, current)


def adapter_aware_checkpoint(module: nn.Module, *args) -> torch.Tensor:
    """Checkpoint ``module(*args)``; its recomputation uses the adapters active now (for
    ``enable_gradient_checkpointing(gradient_checkpointing_func=adapter_aware_checkpoint)``)."""
    layers = lora_layers(module)
    state = adapter_state(layers)

    def context_fn():
        return contextlib.nullcontext(), adapter_state_as(layers, state)

    return checkpoint(module.__call__, *args, use_reentrant=False, context_fn=context_fn)


def enable_block_checkpointing(transformer: nn.Module, fn: Callable = adapter_aware_checkpoint) -> None:
    """diffusers' per-block checkpointing (every transformer block), adapter-aware."""
    transformer.enable_gradient_checkpointing(gradient_checkpointing_func=fn)

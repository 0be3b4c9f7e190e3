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
from typing import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .adapters import adapter_state, adapter_state_as, lora_layers


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

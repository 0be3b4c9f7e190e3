"""Block features through forward hooks (never a copied or patched forward)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import torch
from torch import nn


def last_output(output) -> torch.Tensor:
    """The image-token hidden states of a block's output (SD3 joint blocks return (context, image))."""
    return output[-1] if isinstance(output, (tuple, list)) else output


@contextmanager
def capture_outputs(
    modules: Sequence[nn.Module], extract: Callable[[object], torch.Tensor] = last_output
) -> Iterator[list[torch.Tensor | None]]:
    """Record ``extract(output)`` of each module on every forward inside the block.

    Yields a list with one slot per module (the latest forward's value). The hooks are removed
    when the block exits, also on error.
    """
    captured: list[torch.Tensor | None] = [None] * len(modules)
    handles = []

    def make_hook(slot: int):
        def hook(_module, _inputs, output):
            captured[slot] = extract(output)

        return hook

    try:
        for slot, module in enumerate(modules):
            handles.append(module.register_forward_hook(make_hook(slot)))
        yield captured
    finally:
        for handle in handles:
            handle.remove()

"""Block features through forward hooks (never a copied or patched forward), and forwards that stop
early once the features they need exist."""

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


class _StopForward(BaseException):
    """Raised by :func:`stop_after`'s hook to end a forward; never escapes its ``with`` block.

    A BaseException, like GeneratorExit, so that no ``except Exception`` inside a library forward
    can swallow it and let the forward go on."""


class ForwardStop:
    """What :func:`stop_after` yields: ``stopped`` is True once a forward was ended at the module."""

    def __init__(self) -> None:
        self.stopped = False


@contextmanager
def stop_after(module: nn.Module) -> Iterator[ForwardStop]:
    """End a forward inside the block as soon as ``module`` has returned.

    Nothing after ``module`` runs (later blocks, the output layer), so nothing after it is
    computed or recorded by autograd. Hooks registered on ``module`` before this one (e.g. by
    :func:`capture_outputs`) still see its output: forward hooks run in registration order.
    Only the private stop signal is swallowed; any other exception propagates. The hook is
    removed when the block exits, also on error.
    """
    state = ForwardStop()

    def hook(_module, _inputs, _output):
        state.stopped = True
        raise _StopForward

    handle = module.register_forward_hook(hook)
    try:
        yield state
    except _StopForward:
        pass
    finally:
        handle.remove()


def _detached(output):
    if isinstance(output, torch.Tensor):
        return output.detach()
    if isinstance(output, (tuple, list)):
        return type(output)(_detached(o) for o in output)
    return output  # None (a last block without a context output) and non-tensors pass through


@contextmanager
def detach_after(module: nn.Module) -> Iterator[None]:
    """Forwards inside the block go on past ``module`` outside the autograd graph: its output is
    handed on detached, so later modules (whose parameters must be frozen) record nothing and keep
    no activations for a backward. Hooks registered on ``module`` before this one (e.g. by
    :func:`capture_outputs`) still see the attached output: forward hooks run in registration order.
    The hook is removed when the block exits, also on error."""
    handle = module.register_forward_hook(lambda _module, _inputs, output: _detached(output))
    try:
        yield
    finally:
        handle.remove()

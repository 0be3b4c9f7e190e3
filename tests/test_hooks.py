"""Forwards that stop after a module (swd.models.hooks.stop_after)."""

import pytest
import torch
from torch import nn

from swd.models.hooks import capture_outputs, detach_after, stop_after


class Chain(nn.Module):
    """Three linear layers; ``ran`` records which ones executed."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))
        self.ran: list[int] = []

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            self.ran.append(i)
            x = torch.tanh(layer(x))
        return x


def no_hooks(model: Chain) -> bool:
    return all(len(m._forward_hooks) == 0 for m in model.layers)


def test_stop_after_ends_the_forward_and_earlier_hooks_still_capture():
    model = Chain()
    x = torch.randn(2, 4)
    with capture_outputs([model.layers[1]]) as captured, stop_after(model.layers[1]) as stop:
        model(x)
        pytest.fail("the forward should have stopped")  # never reached
    assert stop.stopped and model.ran == [0, 1]
    assert torch.equal(captured[0], model.layers[1](torch.tanh(model.layers[0](x))))  # the module's own output
    assert no_hooks(model)


def test_stop_after_removes_its_hook_after_another_exception():
    model = Chain()

    def boom(_module, _inputs, _output):
        raise ValueError("boom")

    handle = model.layers[0].register_forward_hook(boom)  # fires before the stop hook
    with pytest.raises(ValueError, match="boom"):  # only the private stop signal is swallowed
        with stop_after(model.layers[2]):
            model(torch.randn(2, 4))
    handle.remove()
    assert no_hooks(model)
    with pytest.raises(RuntimeError, match="inside"):
        with stop_after(model.layers[1]):
            raise RuntimeError("inside")
    assert no_hooks(model)


def test_stop_after_a_module_that_never_runs_is_reported():
    model = Chain()
    other = nn.Linear(4, 4)
    with stop_after(other) as stop:
        y = model(torch.randn(2, 4))
    assert not stop.stopped and y.shape == (2, 4) and model.ran == [0, 1, 2]
    assert len(other._forward_hooks) == 0


def test_detach_after_hands_on_a_detached_output_and_earlier_hooks_see_the_graph():
    model = Chain()
    x = torch.randn(2, 4, requires_grad=True)
    model.requires_grad_(False)
    with capture_outputs([model.layers[1]]) as captured, detach_after(model.layers[1]):
        y = model(x)
    assert model.ran == [0, 1, 2]  # the forward runs to the end
    assert captured[0].requires_grad and not y.requires_grad  # nothing after the module is recorded
    torch.testing.assert_close(y, model(x).detach())  # the same values
    assert no_hooks(model)

"""An exponential moving average of the student (``distill.ema_decay``).

The average covers the student's trainable tensors only (its adapter, or the whole copy), by the
stable names checkpoints use; the update is torch's own (``torch.optim.swa_utils``), applied to
tensor lists instead of through ``AveragedModel``, which would deep-copy the whole shared base
behind a LoRA student. The export and the preview grids use the average; training, the critic's
samples and DMD use the raw student, as in DMD2.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch.optim.swa_utils import get_ema_multi_avg_fn

EMA_PREFIX = "ema."


def check_decay(decay: float) -> float:
    if not 0.0 < decay < 1.0:
        raise ValueError(f"distill.ema_decay must lie in (0, 1) (e.g. 0.99: an average over about 100 updates), or be null for none; got {decay}")
    return float(decay)


class StudentEMA:
    """Shadow copies of ``params`` (name -> the student's trainable parameter), moved toward the
    parameters by ``shadow <- decay * shadow + (1 - decay) * param`` at each :meth:`update`."""

    def __init__(self, params: dict[str, torch.nn.Parameter], decay: float) -> None:
        self.decay = check_decay(decay)
        self.params = params
        self.shadow = {k: p.detach().clone() for k, p in params.items()}
        self._average = get_ema_multi_avg_fn(self.decay)

    @torch.no_grad()
    def update(self) -> None:
        self._average(list(self.shadow.values()), [p.detach() for p in self.params.values()], None)

    def state(self) -> dict[str, torch.Tensor]:
        """The shadow tensors under ``ema.<name>``, for the checkpoint."""
        return {EMA_PREFIX + k: v.detach().contiguous().cpu() for k, v in self.shadow.items()}

    @torch.no_grad()
    def load(self, state: dict[str, torch.Tensor]) -> None:
        missing = sorted(set(self.shadow) - {k.removeprefix(EMA_PREFIX) for k in state})
        if missing:
            raise ValueError(f"the checkpoint has no student average for {missing[:3]}: it was written without "
                             "distill.ema_decay; resume with the config it was made with")
        for k, v in self.shadow.items():
            v.copy_(state[EMA_PREFIX + k].to(v.device, v.dtype))

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The student runs with the averaged weights inside the block; its own come back after."""
        saved = {k: p.detach().clone() for k, p in self.params.items()}
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(self.shadow[k])
        try:
            yield
        finally:
            with torch.no_grad():
                for k, p in self.params.items():
                    p.copy_(saved[k])


def split_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A checkpoint's tensors as (trainable, average)."""
    ema = {k: v for k, v in state.items() if k.startswith(EMA_PREFIX)}
    return {k: v for k, v in state.items() if k not in ema}, ema

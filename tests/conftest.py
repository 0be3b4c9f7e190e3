import os

import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))

# A tiny built-in backbone: same code path as the real teacher, ~40k parameters.
TINY_MODEL = {
    "num_layers": 2,
    "attention_head_dim": 8,
    "num_attention_heads": 2,
    "joint_attention_dim": 16,
    "caption_projection_dim": 16,
    "pooled_projection_dim": 16,
    "num_condition_tokens": 2,
}


def tiny_overrides(**extra) -> list[str]:
    items = {f"model.{k}": v for k, v in TINY_MODEL.items()}
    items.update(extra)
    return [f"{k}={v}" for k, v in items.items()]


@pytest.fixture
def tiny_model_config():
    from swd.config import ModelConfig

    return ModelConfig(**TINY_MODEL)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    yield

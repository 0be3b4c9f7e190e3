import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

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


ROOT = Path(__file__).resolve().parents[1]


def swd(*args: str, check: bool = True, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    """Run the real command line (``python -m swd``, or under ``launcher``) from the repository root."""
    env = dict(os.environ, OMP_NUM_THREADS="2", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, *(launcher or []), "-m", "swd", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"swd {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def swd_in_process(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """The command line's own entry point (``swd.cli.main``) in this process: the same parsing,
    config loading and one-line errors as :func:`swd`, without a new interpreter importing torch
    and diffusers (about 7 s a call on 2 cores). For error paths and short runs; :func:`swd` keeps
    the real process (exit codes, launchers, SIGKILL)."""
    from swd.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    proc = subprocess.CompletedProcess(["swd", *args], code, out.getvalue(), err.getvalue())
    if check and code != 0:
        raise AssertionError(f"swd {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def distill_config(*overrides: str):
    """A DistillConfig from ``key=value`` overrides of the distill section (``"lora.rank=4"``)."""
    from swd.config import load_config

    return load_config(None, [f"distill.{o}" for o in overrides]).distill

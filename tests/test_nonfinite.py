"""A NaN/Inf loss in a real run: stop naming it with the last good checkpoint intact, or skip and count."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY_MODEL, swd_in_process
from swd.config import ModelConfig
from swd.models import build_denoiser, save_denoiser
from swd.train.checkpoints import latest_checkpoint


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher") / "model"
    torch.manual_seed(0)
    cfg = ModelConfig(**TINY_MODEL)
    save_denoiser(build_denoiser(cfg), out, cfg)
    return out


def blow_up(teacher, out, steps, *extra):
    """Student lr 1e30: the first update is finite but leaves weights near 1e30, so the next
    forward overflows and its losses are Inf/NaN."""
    return ["distill", f"distill.teacher={teacher}", f"output_dir={out}", f"distill.steps={steps}", "distill.batch_size=4",
            "distill.lora.rank=4", "distill.critic.updates=1", "distill.optim.lr=1e30", "distill.optim.critic_lr=0.01", "distill.optim.grad_clip=0",
            "distill.checkpoint_every=1", "distill.sample_every=0", "distill.log_every=1", "device=cpu", *extra]


def test_nonfinite_loss_stops_naming_it_and_keeps_the_last_good_checkpoint(teacher_dir, tmp_path):
    proc = swd_in_process(*blow_up(teacher_dir, tmp_path / "run", 6), check=False)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr  # a user error, not a crash
    message = proc.stderr.strip().splitlines()[-1]
    assert "loss '" in message and "step " in message and "stage " in message and "checkpoint is kept" in message
    last = latest_checkpoint(tmp_path / "run")
    assert last is not None and int(last.name.split("_")[1]) >= 1
    state = load_file(str(last / "trainable.safetensors"))
    assert all(torch.isfinite(v).all() for v in state.values())  # nothing non-finite was written


def test_skip_nonfinite_skips_counts_and_finishes(teacher_dir, tmp_path):
    out = tmp_path / "run"
    proc = swd_in_process(*blow_up(teacher_dir, out, 4, "distill.skip_nonfinite=10"))
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 4 and 1 <= summary["skipped_steps"] <= 3
    assert proc.stdout.count("skipped step") + proc.stderr.count("skipped step") == summary["skipped_steps"]
    # with a budget smaller than the number of bad steps the run stops once it is spent
    proc = swd_in_process(*blow_up(teacher_dir, tmp_path / "short", 4, "distill.skip_nonfinite=1"), check=False)
    assert proc.returncode != 0 and "loss '" in proc.stderr


def test_exponent_only_numbers_are_floats_in_configs(tmp_path):
    """YAML 1.1 would read ``5e-6`` as a string and fail deep inside the optimizer."""
    from swd.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text("distill:\n  optim:\n    lr: 5e-6\n    critic_lr: 1E-5\n")
    config = load_config(path, ["distill.optim.weight_decay=1e-2"])
    assert (config.distill.optim.lr, config.distill.optim.critic_lr, config.distill.optim.weight_decay) == (5e-6, 1e-5, 1e-2)

"""Training that cannot be lost: kills, half-written and failed checkpoints."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, TINY_MODEL, tiny_overrides
from swd.config import Config, ModelConfig
from swd.models import build_denoiser, save_denoiser
from swd.train.checkpoints import LATEST_FILE, latest_checkpoint, save_checkpoint


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("teacher") / "model"
    torch.manual_seed(0)
    cfg = ModelConfig(**TINY_MODEL)
    save_denoiser(build_denoiser(cfg), out, cfg)
    return out


def distill_cmd(teacher: Path, out: Path, steps: int) -> list[str]:
    return [sys.executable, "-m", "swd", "distill", f"distill.teacher={teacher}", f"output_dir={out}", f"distill.steps={steps}",
            "distill.batch_size=4", "distill.lora.rank=4", "distill.critic.updates=1", "distill.optim.lr=0.01", "distill.optim.critic_lr=0.01",
            "distill.checkpoint_every=2", "distill.sample_every=0", "distill.log_every=1", "device=cpu"]


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def trainable(out: Path) -> dict:
    return load_file(str(latest_checkpoint(out) / "trainable.safetensors"))


def pretrain_cmd(out: Path, steps: int) -> list[str]:
    # warmup longer than any run here: the LR (linear warmup) does not depend on pretrain.steps, so a
    # run killed on its way to 400 steps and resumed to a shorter length can match a short clean run
    return [sys.executable, "-m", "swd", "pretrain", "-c", str(ROOT / "configs" / "fashion_mnist_teacher.yaml"), *tiny_overrides(),
            f"output_dir={out}", f"pretrain.steps={steps}", "pretrain.batch_size=8", "pretrain.warmup_steps=1000",
            "pretrain.checkpoint_every=2", "pretrain.sample_every=0", "pretrain.log_every=1", "teacher.steps=2", "device=cpu"]


def pretrain_weights(out: Path, which: str) -> dict:
    if which == "checkpoint_weights":  # the training weights in the last complete checkpoint
        return load_file(str(latest_checkpoint(out) / "model.safetensors"))
    return load_file(str(out / "model" / "transformer" / "diffusion_pytorch_model.safetensors"))  # the EMA export


def kill_after_checkpoint(cmd: list[str], out: Path, at_least: int) -> int:
    """Start ``cmd``, SIGKILL it once a complete checkpoint of step >= ``at_least`` exists; returns
    the step of the last complete checkpoint it left."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ, OMP_NUM_THREADS="2"))
    pointer = out / "checkpoints" / LATEST_FILE
    deadline = time.time() + 300
    while time.time() < deadline and not (pointer.is_file() and pointer.read_text().strip() >= f"step_{at_least:07d}"):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    saved = latest_checkpoint(out)
    assert saved is not None and proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    return int(saved.name.split("_")[1])


def test_sigkill_mid_training_resumes_and_matches_uninterrupted(teacher_dir, tmp_path):
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    step = kill_after_checkpoint(distill_cmd(teacher_dir, killed, 40), killed, 4)
    assert 4 <= step < 40
    # resume to a fixed length and compare with a run that was never interrupted
    target = step + 2
    out = run(distill_cmd(teacher_dir, killed, target))
    assert f"at step {step}" in out.stdout
    run(distill_cmd(teacher_dir, clean, target))
    a, b = trainable(killed), trainable(clean)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)


def test_pretrain_sigkill_mid_training_resumes_and_matches_uninterrupted(tmp_path):
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    step = kill_after_checkpoint(pretrain_cmd(killed, 400), killed, 4)
    assert 4 <= step < 400
    target = step + 2
    out = run(pretrain_cmd(killed, target))
    assert f"at step {step}" in out.stdout
    run(pretrain_cmd(clean, target))
    for name in ("checkpoint_weights", "ema_export"):
        a, b = pretrain_weights(killed, name), pretrain_weights(clean, name)
        assert a.keys() == b.keys() and a
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=f"{name}: {key}")


class FakeAccelerator:
    """Just enough of accelerate's interface for save_checkpoint; ``save_state`` can fail midway."""

    is_main_process = True

    def __init__(self, fail: bool = False):
        self.fail = fail

    def wait_for_everyone(self):
        pass

    def save_state(self, path):
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "model.safetensors").write_bytes(b"partial")
        if self.fail:
            raise OSError(28, "No space left on device")


def test_a_half_written_checkpoint_is_never_taken_for_a_complete_one(tmp_path):
    good = save_checkpoint(FakeAccelerator(), tmp_path, 2, Config(), keep=2)
    # a kill while writing step 4 leaves only the temporary folder: the pointer still names step 2
    (tmp_path / "checkpoints" / ".tmp_step_0000004").mkdir()
    assert latest_checkpoint(tmp_path) == good
    # a pointer to an incomplete folder is an error, not a silent resume
    (tmp_path / "checkpoints" / "step_0000006").mkdir()
    (tmp_path / "checkpoints" / LATEST_FILE).write_text("step_0000006")
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        latest_checkpoint(tmp_path)


def test_out_of_disk_while_saving_keeps_the_previous_checkpoint(tmp_path):
    good = save_checkpoint(FakeAccelerator(), tmp_path, 2, Config(), keep=1)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(FakeAccelerator(fail=True), tmp_path, 4, Config(), keep=1)
    assert latest_checkpoint(tmp_path) == good and (good / "model.safetensors").is_file()
    assert not (tmp_path / "checkpoints" / "step_0000004").exists()

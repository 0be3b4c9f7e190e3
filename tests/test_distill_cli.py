"""``swd distill`` through the real command line: resume, DDP, FSDP, export, sample/eval of a student."""

import json
import os
import socket
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import TINY_MODEL, swd, swd_in_process
from swd.config import ModelConfig
from swd.models import build_denoiser, load_denoiser, save_denoiser


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    """A tiny random teacher saved as a model directory (the mechanics do not need a trained one)."""
    out = tmp_path_factory.mktemp("teacher") / "model"
    torch.manual_seed(0)
    cfg = ModelConfig(**TINY_MODEL)
    save_denoiser(build_denoiser(cfg), out, cfg)
    return out


def distill_args(teacher: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return ["distill", f"distill.teacher={teacher}", f"output_dir={out}", f"distill.steps={steps}",
            "distill.batch_size=4", "distill.lora.rank=4", "distill.critic.updates=2", "distill.optim.lr=0.01",
            "distill.optim.critic_lr=0.01", "distill.checkpoint_every=2", "distill.sample_every=0", "distill.log_every=1",
            "device=cpu", *extra]


def trainable(out: Path) -> dict:
    latest = (out / "checkpoints" / "latest").read_text().strip()
    return load_file(str(out / "checkpoints" / latest / "trainable.safetensors"))


def assert_same(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=atol, msg=key)


def test_distill_resume_matches_uninterrupted(teacher_dir, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    swd_in_process(*distill_args(teacher_dir, a, 2))
    state = json.loads((a / "checkpoints" / "step_0000002" / "swd_state.json").read_text())
    assert state["step"] == 2 and state["train_seconds"] > 0
    proc = swd_in_process(*distill_args(teacher_dir, a, 4))
    assert "resumed from" in proc.stdout and "at step 2" in proc.stdout
    swd_in_process(*distill_args(teacher_dir, b, 4))
    wa, wb = trainable(a), trainable(b)
    assert any(".student." in k for k in wa) and any(".critic." in k for k in wa) and any("head" in k for k in wa)
    assert_same(wa, wb, atol=1e-6)
    # checkpoints hold the adapters and the head, not the frozen base
    assert all("lora_" in k or ".head." in k for k in wa)
    # tensorboard scalars per loss and per stage, and the export
    events = list((a / "distill").glob("events.out.tfevents.*"))
    assert events
    assert (a / "student" / "student.json").is_file() and (a / "student_lora" / "pytorch_lora_weights.safetensors").is_file()


def test_backward_simulation_trains_on_other_inputs_and_resumes_exactly(teacher_dir, tmp_path):
    plain, a, b = tmp_path / "plain", tmp_path / "a", tmp_path / "b"
    swd_in_process(*distill_args(teacher_dir, plain, 4))
    simulate = "distill.backward_simulation=0.5"
    swd_in_process(*distill_args(teacher_dir, a, 2, simulate))
    swd_in_process(*distill_args(teacher_dir, a, 4, simulate))  # resumed at step 2: the draws are step-seeded
    swd_in_process(*distill_args(teacher_dir, b, 4, simulate))
    assert_same(trainable(a), trainable(b), atol=1e-6)
    w_plain, w_sim = trainable(plain), trainable(b)
    assert max(float((w_plain[k] - w_sim[k]).abs().max()) for k in w_plain) > 1e-5  # some step trained on its own inputs


def test_resume_with_another_loss_config_names_the_keys(teacher_dir, tmp_path):
    swd_in_process(*distill_args(teacher_dir, tmp_path, 2))
    proc = swd_in_process(*distill_args(teacher_dir, tmp_path, 4, "distill.loss.mmd_kernel=rbf"), check=False)
    assert proc.returncode != 0
    assert "distill.loss.mmd_kernel: checkpoint 'linear' vs now 'rbf'" in proc.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ddp_processes_match_one_process_on_the_whole_batch(teacher_dir, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    swd(*distill_args(teacher_dir, one, 2))
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    proc = swd(*distill_args(teacher_dir, two, 2), launcher=launcher)
    assert json.loads((two / "train_summary.json").read_text())["processes"] == 2, proc.stdout
    w1, w2 = trainable(one), trainable(two)
    assert_same(w1, w2, atol=1e-4)
    # and the update is not trivially zero
    assert max(float(v.abs().max()) for k, v in w1.items() if "lora_B" in k) > 1e-4


def checkpoint_state(out: Path, step: int) -> dict:
    """A FSDP checkpoint's trainable tensors and optimizer states (whole tensors, any number of processes)."""
    directory = out / "checkpoints" / f"step_{step:07d}"
    optimizer = load_file(str(directory / "optimizer_state.safetensors"))
    return {**load_file(str(directory / "trainable.safetensors")), **{f"optimizer.{k}": v for k, v in optimizer.items()}}


def test_two_fsdp_processes_match_one_process_and_resume(teacher_dir, tmp_path):
    """distill.distributed=fsdp: 2 gloo processes, each holding half the base, make the update of
    1 process on the whole batch, and resuming their sharded checkpoint continues it."""
    one, two = tmp_path / "one", tmp_path / "two"
    swd_in_process(*distill_args(teacher_dir, one, 4, "distill.distributed=fsdp"))  # checkpoints at steps 2 and 4

    def two_processes(steps: int):
        launcher = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
        return swd(*distill_args(teacher_dir, two, steps, "distill.distributed=fsdp", "distill.sample_every=2"), launcher=launcher)

    proc = two_processes(2)
    s1, s2 = (json.loads((out / "train_summary.json").read_text()) for out in (one, two))
    assert s2["processes"] == 2 and s2["distributed"] == "fsdp", proc.stdout
    assert s2["parameters_held"] < 0.6 * s1["parameters_held"]  # the shared base sharded once, not once per role
    first = checkpoint_state(one, 2)
    assert any(".student." in k for k in first) and any(".critic." in k for k in first) and any("exp_avg_sq" in k for k in first)
    assert_same(first, checkpoint_state(two, 2), atol=1e-4)
    assert max(float(v.abs().max()) for k, v in first.items() if "lora_B" in k and not k.startswith("optimizer.")) > 1e-4
    proc = two_processes(4)
    assert "resumed from" in proc.stdout and "at step 2" in proc.stdout
    assert_same(checkpoint_state(one, 4), checkpoint_state(two, 4), atol=1e-4)
    # the export, gathered from the shards onto a whole copy of the teacher
    lora = "student_lora/pytorch_lora_weights.safetensors"
    assert_same(load_file(str(one / lora)), load_file(str(two / lora)), atol=1e-4)
    assert (two / "student" / "student.json").is_file()
    assert (two / "samples" / "step_0000004.png").is_file()  # previews: every process runs the sharded student


def test_resume_takes_a_key_the_checkpoint_predates_as_its_default():
    from swd.config import config_to_dict, load_config
    from swd.distill.trainer import RESUME_SECTIONS
    from swd.train.checkpoints import check_resume_config

    config = load_config(None, [])
    older = config_to_dict(config)
    del older["distill"]["distributed"]  # a checkpoint from before the setting existed
    check_resume_config(older, config, RESUME_SECTIONS)
    with pytest.raises(ValueError, match="distill.distributed: checkpoint 'ddp' vs now 'fsdp'"):
        check_resume_config(older, load_config(None, ["distill.distributed=fsdp"]), RESUME_SECTIONS)


def test_mmd_only_full_student_and_its_export(teacher_dir, tmp_path):
    out = tmp_path / "mmd"
    swd(*distill_args(teacher_dir, out, 2, "distill.loss.dmd_weight=0", "distill.loss.gan_weight=0", "distill.student=full",
                      "distill.sample_every=2"))
    w = trainable(out)
    assert w and not any(k.startswith("critic.") for k in w)  # no critic was built
    assert not (out / "student_lora").exists()  # a full student has no adapter to export
    assert Image.open(out / "samples" / "step_0000002.png").size[0] > 10 * 32
    model, _ = load_denoiser(out / "student")
    teacher, _ = load_denoiser(teacher_dir)
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, dict(teacher.named_parameters())[n])]
    assert changed


def test_lora_export_equals_merged_export_and_both_sample(teacher_dir, tmp_path):
    out = tmp_path / "run"
    swd(*distill_args(teacher_dir, out, 2, "distill.mode=fullres"))
    record = json.loads((out / "student" / "student.json").read_text())
    assert record["schedule"]["sizes"] == [[32, 32]] * 4 and record["guidance"] == 1.0
    from swd.registry import load_student_lora

    merged, _ = load_denoiser(out / "student")
    lora = load_student_lora(out / "student_lora")
    teacher, _ = load_denoiser(teacher_dir)
    x, s, y = torch.randn(3, 1, 32, 32), torch.full((3,), 0.6), torch.tensor([0, 1, 2])
    with torch.no_grad():
        vm, vl, vt = merged(x, s, y), lora(x, s, y), teacher(x, s, y)
    torch.testing.assert_close(vm, vl, rtol=0, atol=1e-5)
    assert (vm - vt).abs().max() > 1e-4  # the student is not the teacher
    for name in ("student", "student_lora"):
        dest = tmp_path / f"s_{name}"
        proc = swd("sample", f"checkpoint={out / name}", f"output_dir={dest}", "sample.num_images=10", "device=cpu")
        assert Image.open(dest / "samples.png").size[0] > 10 * 32, proc.stdout
        sampler = json.loads((dest / "sampler.json").read_text())
        assert sampler["schedule"]["sizes"] == [[32, 32]] * 4 and sampler["mode"] == "scalewise"  # the student's own schedule was used


def test_a_student_samples_with_the_upsampling_it_was_distilled_with(teacher_dir, tmp_path):
    from swd.commands import resolve_sampler
    from swd.config import load_config
    from swd.student import upsample_mode_of

    out = tmp_path / "run"
    swd_in_process(*distill_args(teacher_dir, out, 1, "schedule.upsample_mode=nearest"))
    for name in ("student", "student_lora"):
        sampler = resolve_sampler(load_config(None, []), str(out / name))  # the config's own mode is bicubic
        assert sampler.mode == "scalewise" and sampler.upsample_mode == "nearest", name
    dest = tmp_path / "s"
    swd_in_process("sample", f"checkpoint={out / 'student'}", f"output_dir={dest}", "sample.num_images=2", "device=cpu")
    assert json.loads((dest / "sampler.json").read_text())["schedule"]["upsample_mode"] == "nearest"
    old = json.loads((out / "student" / "student.json").read_text())
    del old["schedule"]["upsample_mode"]  # a record written before the mode was recorded
    assert upsample_mode_of(old) == "bicubic"


def test_a_second_round_distils_from_a_student_with_the_guided_regression_alone(teacher_dir, tmp_path):
    """configs/distill_twemoji_swd4_guidance_round.yaml in small: round 1's student is round 2's frozen
    teacher; the regression onto its guided prediction alone trains a new LoRA (no critic)."""
    first, second = tmp_path / "first", tmp_path / "second"
    swd_in_process(*distill_args(teacher_dir, first, 2))
    round2 = ("distill.loss.dmd_weight=0", "distill.loss.gan_weight=0", "distill.loss.mmd_weight=0",
              "distill.loss.teacher_regression_weight=1.0", "distill.loss.dmd_guidance=2.0", "distill.backward_simulation=1.0")
    swd_in_process(*distill_args(first / "student", second, 2, *round2))
    record = json.loads((second / "student" / "student.json").read_text())
    assert record["teacher"] == str(first / "student") and record["step"] == 2
    weights = trainable(second)
    assert weights and not any(".critic." in k or ".head." in k for k in weights)  # regression only: no critic
    assert max(float(v.abs().max()) for k, v in weights.items() if "lora_B" in k) > 0  # lora_B starts at 0: it trained


def test_eval_takes_a_student_checkpoint(teacher_dir, tmp_path):
    out = tmp_path / "run"
    swd(*distill_args(teacher_dir, out, 1, "distill.loss.dmd_weight=0", "distill.loss.gan_weight=0"))
    env_cache = tmp_path / "cache"
    os.environ["SWD_CACHE_DIR"] = str(env_cache)
    try:
        swd("eval", f"checkpoint={out / 'student'}", f"output_dir={tmp_path / 'e'}", "eval.num_samples=10", "eval.batch_size=10",
            "eval.reference_images=20", "eval.fid_batch_size=10", "device=cpu", "--name", "swd-4")
    finally:
        del os.environ["SWD_CACHE_DIR"]
    record = json.loads((tmp_path / "e" / "eval.json").read_text())
    assert record["name"] == "swd-4" and record["steps"] == 4 and record["nfe"] == 4 and record["guidance"] == 1.0


def test_distill_rejects_bad_input_before_training(teacher_dir, tmp_path):
    proc = swd_in_process(*distill_args(teacher_dir, tmp_path / "x", 2, "schedule.sizes=[16,21,24,32]"), check=False)
    assert proc.returncode != 0 and "not divisible by the patch size" in proc.stderr
    proc = swd_in_process(*distill_args(teacher_dir, tmp_path / "y", 2, "distill.lora.rank=0"), check=False)
    assert proc.returncode != 0 and "distill.lora.rank must be >= 1" in proc.stderr
    proc = swd_in_process(*distill_args(teacher_dir, tmp_path / "w", 2, "distill.backward_simulation=1.5"), check=False)
    assert proc.returncode != 0 and "distill.backward_simulation is the share of steps" in proc.stderr
    proc = swd(*distill_args(tmp_path / "nope", tmp_path / "z", 2), check=False)
    assert proc.returncode != 0 and "does not exist" in proc.stderr
    assert not (tmp_path / "x" / "checkpoints").exists()


def test_demo_distils_then_writes_the_table_and_pictures(tmp_path):
    out = tmp_path / "demo"
    os.environ["SWD_CACHE_DIR"] = str(tmp_path / "cache")
    try:
        proc = swd("demo", f"output_dir={out}", "distill.steps=2", "distill.batch_size=4", "eval.num_samples=10",
                   "eval.batch_size=10", "eval.reference_images=20", "eval.fid_batch_size=10", "teacher.steps=3", "device=cpu")
    finally:
        del os.environ["SWD_CACHE_DIR"]
    records = json.loads((out / "demo.json").read_text())
    assert [r["name"] for r in records] == ["teacher", "undistilled", "swd-student"]
    assert [r["nfe"] for r in records] == [6, 8, 4]  # guided teacher 3 steps, guided 4-step, unguided student
    assert all(r["fid"] > 0 and 0 <= r["class_accuracy"] <= 1 and r["seconds_per_image"] > 0 for r in records)
    assert all(0 <= r["precision"] <= 1 and 0 <= r["recall"] <= 1 for r in records)
    assert "| swd-student | 4 | 4 |" in proc.stdout
    sbs = Image.open(out / "side_by_side.png")
    assert sbs.size[0] > 3 * 10 * 32  # three grids next to each other
    assert (out / "student_steps.png").is_file() and (out / "distill" / "student" / "student.json").is_file()


def test_bf16_and_gradient_checkpointing_run(teacher_dir, tmp_path):
    out = tmp_path / "bf16"
    swd(*distill_args(teacher_dir, out, 1, "distill.mixed_precision=bf16", "distill.gradient_checkpointing=true"))
    w = trainable(out)
    assert all(torch.isfinite(v).all() for v in w.values())
    assert max(float(v.abs().max()) for k, v in w.items() if "lora_B" in k) > 0  # it trained


def test_text_conditioned_rgb_distillation_on_a_folder(tmp_path):
    """Captions through the text encoder, 3 channels, the image-folder data path."""
    from test_cli import write_caption_folder

    data = tmp_path / "data"
    write_caption_folder(data)
    teacher = tmp_path / "teacher"
    cfg = ModelConfig(**{**TINY_MODEL, "conditioning": "text", "text_encoder": "minilm", "in_channels": 3, "max_text_length": 8})
    torch.manual_seed(0)
    save_denoiser(build_denoiser(cfg), teacher, cfg)
    (teacher / "prompts.txt").write_text("a red square\na blue square\n")  # the teacher's default eval prompts
    out = tmp_path / "run"
    swd(*distill_args(teacher, out, 2, "data.kind=folder", f"data.root={data}", "distill.sample_every=2"))
    assert Image.open(out / "samples" / "step_0000002.png").mode == "RGB"
    from swd.registry import default_prompts

    assert default_prompts(str(out / "student")) == default_prompts(str(out / "student_lora")) == ["a red square", "a blue square"]
    swd("sample", f"checkpoint={out / 'student'}", f"output_dir={tmp_path / 's'}", "sample.num_images=2",
        "sample.prompts=[a red square]", "device=cpu")
    assert Image.open(tmp_path / "s" / "samples.png").mode == "RGB"


def test_same_seed_same_samples_bitwise(teacher_dir, tmp_path):
    """Two `swd sample` runs with one seed and config write identical images (CPU)."""
    for name in ("a", "b"):
        swd("sample", f"checkpoint={teacher_dir}", f"output_dir={tmp_path / name}", "sample.mode=scalewise",
            "sample.num_images=10", "sample.seed=3", "device=cpu")
    a = (tmp_path / "a" / "samples.png").read_bytes()
    assert a == (tmp_path / "b" / "samples.png").read_bytes()
    swd("sample", f"checkpoint={teacher_dir}", f"output_dir={tmp_path / 'c'}", "sample.mode=scalewise",
        "sample.num_images=10", "sample.seed=4", "device=cpu")
    assert a != (tmp_path / "c" / "samples.png").read_bytes()


def test_student_average_resumes_exactly_and_is_what_the_export_holds(teacher_dir, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    swd_in_process(*distill_args(teacher_dir, a, 2, "distill.ema_decay=0.5"))
    swd_in_process(*distill_args(teacher_dir, a, 4, "distill.ema_decay=0.5"))
    swd_in_process(*distill_args(teacher_dir, b, 4, "distill.ema_decay=0.5"))
    wa, wb = trainable(a), trainable(b)
    assert_same(wa, wb, atol=1e-6)  # the average is checkpointed and resumed with the rest
    raw = {k: v for k, v in wa.items() if k.startswith("student.")}
    ema = {k.removeprefix("ema."): v for k, v in wa.items() if k.startswith("ema.")}
    assert ema.keys() == raw.keys()
    lora_b = [k for k in raw if "lora_B" in k]
    assert any((ema[k] - raw[k]).abs().max() > 1e-4 for k in lora_b)  # the average lags the trained weights
    exported = load_file(str(a / "student_lora" / "pytorch_lora_weights.safetensors"))
    for k in lora_b:  # student.denoiser.transformer.<path>.lora_B.student.weight -> [transformer.]<path>.lora_B.weight
        path = k.removeprefix("student.denoiser.transformer.").split(".lora_B.")[0]
        match = [v for e, v in exported.items() if e.removeprefix("transformer.") == path + ".lora_B.weight"]
        assert len(match) == 1, (k, list(exported)[:3])
        torch.testing.assert_close(match[0], ema[k], rtol=0, atol=0)
    # a run without the average cannot resume this checkpoint
    proc = swd_in_process(*distill_args(teacher_dir, a, 6), check=False)
    assert proc.returncode != 0 and "distill.ema_decay: checkpoint 0.5 vs now None" in proc.stderr
    proc = swd_in_process(*distill_args(teacher_dir, tmp_path / "c", 2, "distill.ema_decay=1.5"), check=False)
    assert proc.returncode != 0 and "distill.ema_decay must lie in (0, 1)" in proc.stderr

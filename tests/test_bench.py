"""``swd bench``: formulas and the real command on a tiny teacher."""

import json

import pytest
import torch

from conftest import TINY_MODEL, swd
from swd.bench import half_schedule, ideal_flops_ratio, ideal_token_ratio
from swd.config import ModelConfig
from swd.models import build_denoiser, save_denoiser
from swd.schedule import ScaleSchedule

SWD4 = ScaleSchedule([16, 20, 24, 32], [1.0, 0.8959, 0.7371, 0.6022, 0.0])


def test_ideal_ratios():
    # tokens per stage with patch 2: 64, 100, 144, 256
    assert ideal_token_ratio(SWD4, 2) == pytest.approx((64 + 100 + 144 + 256) / (4 * 256))
    # the attention term grows with L^2, so it favours the small stages: a lower ratio
    assert ideal_flops_ratio(SWD4, 2, width=128, condition_tokens=0) < ideal_token_ratio(SWD4, 2)
    constant = ScaleSchedule.constant(32, SWD4.sigmas)
    assert ideal_token_ratio(constant, 2) == 1.0 and ideal_flops_ratio(constant, 2, 128, 4) == pytest.approx(1.0)


def test_half_schedule_keeps_every_other_sigma_at_full_size():
    half = half_schedule(SWD4)
    assert half.sizes == ((32, 32),) * 2 and half.sigmas == (1.0, 0.7371, 0.0)


def test_bench_command_writes_json_table_and_plot(tmp_path):
    teacher = tmp_path / "teacher"
    torch.manual_seed(0)
    cfg = ModelConfig(**TINY_MODEL)
    save_denoiser(build_denoiser(cfg), teacher, cfg)
    out = tmp_path / "bench"
    proc = swd("bench", f"checkpoint={teacher}", f"output_dir={out}", "bench.batch_size=4", "bench.repeats=2",
               "bench.train_repeats=1", "bench.warmup=0", "teacher.steps=2", "distill.lora.rank=4", "distill.critic.updates=1",
               "distill.loss.mmd_stages=[1,2,3]", "device=cpu")  # the shipped configs' setting: no MMD at stage 0
    r = json.loads((out / "bench.json").read_text())
    for key in ("sample_ratio_swd_over_fullres", "ideal_token_ratio", "train_ratio_scalewise_over_fullres",
                "train_ratio_mmd_over_full", "peak_memory_mb", "params_held"):
        assert key in r, key
    assert set(r["sample_seconds_per_image"]) == {"swd-4", "fullres-4", "fullres-2", "teacher-2"}
    assert set(r["train_seconds_per_iteration"]) == {"scalewise-full", "scalewise-mmd", "fullres-full", "fullres-mmd"}
    assert all(t > 0 for t in r["train_seconds_per_iteration"].values())  # MMD alone trains stage 0 too
    assert all(len(v) == 2 for v in r["raw"]["sample_seconds_per_round"].values())
    assert r["sample_nfe"]["teacher-2"] == 4 and r["sample_nfe"]["swd-4"] == 4
    assert r["params_held"] > sum(p.numel() for p in build_denoiser(cfg).parameters())
    assert (out / "bench.png").stat().st_size > 1000 and "SwD / full resolution sampling" in proc.stdout


def test_per_image_timing_is_the_median_round_over_its_images():
    from swd.timing import per_image_timing
    r = per_image_timing([3.0, 1.0, 2.0], images_per_round=4)
    assert r["sample_seconds_per_image"] == 0.5
    assert r["sample_timing"] == {"images_per_round": 4, "rounds": 3, "seconds_per_round": [3.0, 1.0, 2.0]}
    with pytest.raises(ValueError, match="images_per_round"):
        per_image_timing([1.0], images_per_round=0)


def test_sampling_workload_samples_a_student_with_its_own_schedule(tmp_path):
    from swd.commands import sampling_workload
    from swd.student import STUDENT_FILE, student_record
    model_dir = tmp_path / "model"
    torch.manual_seed(0)
    cfg = ModelConfig(**TINY_MODEL)
    save_denoiser(build_denoiser(cfg), model_dir, cfg)
    sampler, _, values, run = sampling_workload(str(model_dir), images=3)
    assert sampler.mode == "teacher" and len(values) == 3 and run().shape[0] == 3
    record = student_record(ScaleSchedule([8, 16], [1.0, 0.7, 0.0]), "scalewise", "teacher", 10, upsample_mode="nearest")
    (model_dir / STUDENT_FILE).write_text(json.dumps(record))
    sampler, _, _, run = sampling_workload(str(model_dir), images=2)
    assert sampler.mode == "scalewise" and sampler.upsample_mode == "nearest" and sampler.schedule.sizes == ((8, 8), (16, 16))
    assert run().shape[0] == 2

"""The real command line, for a few steps on tiny models."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from conftest import ROOT, swd, swd_in_process, tiny_overrides

CONFIG = str(ROOT / "configs" / "fashion_mnist_teacher.yaml")


def pretrain_args(out: Path, steps: int) -> list[str]:
    return ["pretrain", "-c", CONFIG, *tiny_overrides(), f"output_dir={out}", f"pretrain.steps={steps}",
            "pretrain.batch_size=8", "pretrain.checkpoint_every=2", "pretrain.sample_every=0", "pretrain.log_every=1",
            "teacher.steps=2", "device=cpu"]


def weights(out: Path) -> dict:
    return load_file(str(out / "model" / "transformer" / "diffusion_pytorch_model.safetensors"))


def test_help_lists_subcommands():
    out = swd("--help").stdout
    for name in ("pretrain", "sample", "eval"):
        assert name in out
    assert "key.sub=value" in swd("pretrain", "--help").stdout


def test_bad_override_is_a_clear_error(tmp_path):
    proc = swd("pretrain", "-c", CONFIG, "pretrain.stepz=3", check=False)
    assert proc.returncode == 2
    assert "unknown config key(s) pretrain.stepz" in proc.stderr


@pytest.mark.parametrize("override, message", [
    ("distill.optim.lr=abc", "distill.optim.lr='abc' is not a number"),
    ("distill.steps=1.5", "distill.steps=1.5 is not an integer"),
    ("distill.fold_adapters=3", "distill.fold_adapters=3 is not true or false or a string"),
    ("schedule.sigmas=[1.0, high, 0.0]", "schedule.sigmas[1]='high' is not a number"),
    ("sample.labels=[1, two]", "sample.labels[1]='two' is not an integer"),
    ("sample.prompts=[red apple, flag: France]", "sample.prompts[1]={'flag': 'France'} is not a string. YAML read a 'key: value' "
                                                 "inside it as a mapping: quote a prompt that holds a colon"),
    ("distill.lr=1e-4", "distill.lr is now distill.optim.lr"),
    ("distill.lora_rank=4", "distill.lora_rank is now distill.lora.rank"),
])
def test_ill_typed_values_are_refused_at_load_time(override, message):
    """Named key, value and expected type, one line, exit 2, before any model loads."""
    proc = swd("distill", override, check=False)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_typed_values_that_fit_are_kept():
    from swd.config import load_config

    config = load_config(None, ["distill.optim.lr=3", "schedule.sizes=[8, [12, 16]]", "sample.prompts=prompts.txt",
                                "sample.prompts=[a, 'flag: France']", "distill.lora.targets=.*to_q"])
    assert config.distill.optim.lr == 3.0 and isinstance(config.distill.optim.lr, float)
    assert config.schedule.sizes == [8, [12, 16]] and config.sample.prompts == ["a", "flag: France"]
    assert config.distill.lora.targets == ".*to_q"
    assert load_config(None, ["sample.prompts=prompts.txt"]).sample.prompts == "prompts.txt"  # a prompt file


def test_pretrain_resume_continues_and_matches_uninterrupted(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    swd_in_process(*pretrain_args(a, 2))
    state = json.loads((a / "checkpoints" / "step_0000002" / "swd_state.json").read_text())
    assert state["step"] == 2
    proc = swd_in_process(*pretrain_args(a, 4))
    assert "resumed from" in proc.stdout and "at step 2" in proc.stdout
    assert (a / "checkpoints" / "latest").read_text().strip() == "step_0000004"
    saved = yaml.safe_load((a / "config.yaml").read_text())
    assert saved["pretrain"]["steps"] == 4 and saved["model"]["num_layers"] == 2

    swd_in_process(*pretrain_args(b, 4))
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=0, atol=1e-6, msg=key)


def test_resume_with_another_model_config_names_the_keys(tmp_path):
    swd_in_process(*pretrain_args(tmp_path, 2))
    proc = swd_in_process(*pretrain_args(tmp_path, 4), "model.num_layers=1", check=False)
    assert proc.returncode != 0
    assert "model.num_layers: checkpoint 2 vs now 1" in proc.stderr


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("teacher")
    swd(*pretrain_args(out, 2))
    return out / "model"


@pytest.mark.parametrize("mode", ["teacher", "scalewise"])
def test_sample_writes_grid_and_strip(tiny_teacher, tmp_path, mode):
    swd("sample", "-c", CONFIG, f"checkpoint={tiny_teacher}", f"output_dir={tmp_path}", f"sample.mode={mode}",
        "sample.num_images=10", "sample.intermediates=true", "teacher.steps=3", "device=cpu")
    grid = Image.open(tmp_path / "samples.png")
    strip = Image.open(tmp_path / "steps.png")
    assert grid.size[0] > 10 * 32
    n_steps = 3 if mode == "teacher" else 4
    assert abs(strip.size[0] - 2 * (n_steps * 34 + 2)) <= 2  # one column per step, scale 2, padding 2
    assert (tmp_path / "config.yaml").is_file()


def test_sample_compiled_writes_the_same_grid_and_refuses_an_unknown_backend(tiny_teacher, tmp_path):
    common = ("sample", f"checkpoint={tiny_teacher}", "sample.mode=scalewise", "sample.num_images=4", "device=cpu")
    swd_in_process(*common, f"output_dir={tmp_path / 'eager'}")
    swd_in_process(*common, f"output_dir={tmp_path / 'compiled'}", "sample.compile=eager")
    eager, compiled = (np.asarray(Image.open(tmp_path / d / "samples.png")) for d in ("eager", "compiled"))
    assert np.array_equal(eager, compiled)
    proc = swd_in_process(*common, f"output_dir={tmp_path / 'bad'}", "sample.compile=turbo", check=False)
    assert proc.returncode != 0 and "unknown compile backend 'turbo'" in proc.stderr


def test_sample_guidance_interval_guides_the_first_step_only_and_refuses_a_bad_one(tiny_teacher, tmp_path):
    common = ("sample", f"checkpoint={tiny_teacher}", "sample.mode=scalewise", "sample.num_images=4", "sample.guidance=3.0", "device=cpu")
    swd_in_process(*common, f"output_dir={tmp_path / 'first'}", "sample.guidance_interval=[0.9,1.0]")
    sampler = json.loads((tmp_path / "first" / "sampler.json").read_text())
    assert sampler["guidance_interval"] == [0.9, 1.0] and (sampler["steps"], sampler["nfe"]) == (4, 5)
    proc = swd_in_process(*common, f"output_dir={tmp_path / 'bad'}", "sample.guidance_interval=[1.0,0.9]", check=False)
    assert proc.returncode != 0 and "guidance interval [1.0, 0.9] must satisfy 0 <= lo <= hi <= 1" in proc.stderr


def test_sample_rejects_bad_schedule(tiny_teacher, tmp_path):
    proc = swd_in_process("sample", f"checkpoint={tiny_teacher}", f"output_dir={tmp_path}", "sample.mode=scalewise",
                          "schedule.sizes=[16,32]", "schedule.sigmas=[1.0,0.5]", check=False)
    assert proc.returncode != 0
    assert "2 sizes and 2 sigmas" in proc.stderr


def write_caption_folder(root: Path, n: int = 6) -> None:
    root.mkdir()
    rows = ["index,file_name,caption"]
    for i in range(n):
        color = (40 * i % 255, 255 - 30 * i, 128)
        Image.new("RGB", (40, 36), color).save(root / f"img_{i}.png")
        rows.append(f"{i},img_{i}.png,a {'red' if i % 2 else 'blue'} square number {i}")
    (root / "metainfo.csv").write_text("\n".join(rows) + "\n")


def test_text_conditioned_rgb_teacher_on_a_folder(tmp_path):
    data = tmp_path / "data"
    write_caption_folder(data)
    out = tmp_path / "run"
    swd("pretrain", *tiny_overrides(), "model.conditioning=text", "model.text_encoder=minilm", "model.in_channels=3",
        "model.max_text_length=8", "data.kind=folder", f"data.root={data}", f"output_dir={out}", "pretrain.steps=2",
        "pretrain.batch_size=4", "pretrain.sample_every=2", "pretrain.checkpoint_every=2", "teacher.steps=2", "device=cpu")
    assert (out / "model" / "conditioner.safetensors").is_file()
    preview = Image.open(out / "samples" / "step_0000002.png")
    assert preview.mode == "RGB"
    swd("sample", f"checkpoint={out / 'model'}", f"output_dir={tmp_path / 's'}", "sample.num_images=2",
        "sample.prompts=[a red square]", "sample.mode=scalewise", "device=cpu")
    assert Image.open(tmp_path / "s" / "samples.png").mode == "RGB"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\n\nflag: France\n")  # a prompt file: colons need no quoting
    swd("sample", f"checkpoint={out / 'model'}", f"output_dir={tmp_path / 'f'}", "sample.num_images=3",
        f"sample.prompts={prompts}", "sample.mode=scalewise", "device=cpu")
    assert Image.open(tmp_path / "f" / "samples.png").size[1] > Image.open(tmp_path / "s" / "samples.png").size[1]  # 3 images in 2 rows, not 2 in 1
    sampler = json.loads((tmp_path / "f" / "sampler.json").read_text())
    assert sampler["mode"] == "scalewise" and sampler["schedule"]["sizes"][0] == [16, 16]


def test_eval_writes_record_and_summary(tiny_teacher, tmp_path):
    env_cache = tmp_path / "cache"
    os.environ["SWD_CACHE_DIR"] = str(env_cache)
    try:
        proc = swd("eval", "-c", CONFIG, f"checkpoint={tiny_teacher}", f"output_dir={tmp_path}", "eval.mode=scalewise",
                   "eval.num_samples=10", "eval.batch_size=10", "eval.reference_images=20", "eval.fid_batch_size=10", "device=cpu")
    finally:
        del os.environ["SWD_CACHE_DIR"]
    record = json.loads((tmp_path / "eval.json").read_text())
    assert record["num_samples"] == 10 and record["steps"] == 4 and record["nfe"] == 8
    assert record["fid"] > 0 and 0.0 <= record["class_accuracy"] <= 1.0 and record["seconds_per_image"] > 0
    assert list(record) == ["name", "mode", "steps", "guidance", "nfe", "fid", "class_accuracy", "precision", "recall", "density",
                            "coverage", "seconds_per_image", "num_samples", "reference_images", "checkpoint", "device"]
    assert all(0.0 <= record[key] <= 1.0 for key in ("precision", "recall", "coverage")) and record["density"] >= 0
    assert "FID" in proc.stdout and "class accuracy" in proc.stdout
    assert list(env_cache.rglob("*.pt")), "the FID reference statistics were not cached"

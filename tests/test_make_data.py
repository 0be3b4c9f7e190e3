"""``swd make-data``: teacher samples written as an image-caption folder, resumable and sharded."""

import csv
import re
import socket

import numpy as np
import pytest
import torch
from conftest import TINY_MODEL, swd, swd_in_process
from PIL import Image
from tiny_pipelines import tiny_sd3_pipeline

from swd.cli import main
from swd.config import load_config
from swd.config import ModelConfig
from swd.data import ImageCaptionFolder, ImageLabelFolder
from swd.models import build_denoiser, save_denoiser
from swd.make_data import TEMP_SUFFIX, make_data, present_indices, shard

PROMPTS = "a red car\n\n  a blue house  \nthe cat, with \"quotes\"\n"


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    return tiny_sd3_pipeline(tmp_path_factory.mktemp("pipe") / "sd3")


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text(PROMPTS)
    return path


def overrides(sd3, prompts, out, **extra) -> list[str]:
    items = {
        "model.pretrained": sd3, "model.max_text_length": 16, "make_data.prompts": prompts, "make_data.output_dir": out,
        "schedule.sizes": "[8,16]", "schedule.sigmas": "[1.0,0.6,0.0]", "teacher.steps": 3, "device": "cpu",
    }
    items.update(extra)
    return [f"{k}={v}" for k, v in items.items()]


def run(*args, **extra):
    return make_data(load_config(None, overrides(*args, **extra)))


def rows(folder):
    with (folder / "metainfo.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def pixels(folder, i):
    return np.asarray(Image.open(folder / "images" / f"{i:07d}.png"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_two_processes_write_a_folder_that_distill_reads(sd3, prompts, tmp_path):
    out = tmp_path / "data"
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    proc = swd("make-data", *overrides(sd3, prompts, out, **{"make_data.num_images": 5, "make_data.batch_size": 2}), launcher=launcher)
    assert "2 process(es)" in proc.stderr
    table = rows(out)
    assert [r["index"] for r in table] == ["0", "1", "2", "3", "4"]
    assert [r["caption"] for r in table] == ["a red car", "a blue house", 'the cat, with "quotes"', "a red car", "a blue house"]
    data = ImageCaptionFolder(out, size=32)
    assert len(data) == 5 and data[2]["caption"] == 'the cat, with "quotes"'
    assert Image.open(out / "images" / "0000004.png").size == (32, 32)  # latent 16 x VAE factor 2
    assert (out / "config.yaml").is_file() and (out / "make_data.json").is_file()
    # the same indices from one process, another batch size, in one run: the same images (up to one
    # uint8 level: a batch of another size may round its float sums differently)
    single = run(sd3, prompts, tmp_path / "single", **{"make_data.num_images": 5, "make_data.batch_size": 5})
    for i in range(5):
        diff = np.abs(pixels(out, i).astype(int) - pixels(single, i).astype(int))
        assert diff.max() <= 1 and diff.mean() < 0.01


def test_resume_adds_images_without_duplicates_and_ignores_interrupted_ones(sd3, prompts, tmp_path):
    out = run(sd3, prompts, tmp_path / "data", **{"make_data.num_images": 2, "make_data.batch_size": 1})
    first = {i: (out / "images" / f"{i:07d}.png").read_bytes() for i in range(2)}
    assert [r["index"] for r in rows(out)] == ["0", "1"]
    interrupted = out / "images" / f"{2:07d}.png{TEMP_SUFFIX}"
    interrupted.write_bytes(b"half a png")
    assert present_indices(out) == {0, 1}

    run(sd3, prompts, out, **{"make_data.num_images": 4, "make_data.batch_size": 3})
    assert [r["index"] for r in rows(out)] == ["0", "1", "2", "3"]
    assert {i: (out / "images" / f"{i:07d}.png").read_bytes() for i in range(2)} == first
    assert not interrupted.exists()
    assert len(ImageCaptionFolder(out, size=32)) == 4
    # per-index seeding: the same images as one run of 4
    whole = run(sd3, prompts, tmp_path / "whole", **{"make_data.num_images": 4, "make_data.batch_size": 4})
    for i in range(4):
        np.testing.assert_array_equal(pixels(out, i), pixels(whole, i))
    # a rerun with nothing missing changes nothing and keeps one row per image
    run(sd3, prompts, out, **{"make_data.num_images": 4})
    assert [r["index"] for r in rows(out)] == ["0", "1", "2", "3"]
    # asking for fewer lists fewer; the images beyond stay on disk
    run(sd3, prompts, out, **{"make_data.num_images": 2})
    assert [r["index"] for r in rows(out)] == ["0", "1"] and present_indices(out) == {0, 1, 2, 3}


def test_default_count_is_one_per_prompt_and_output_defaults_to_data_root(sd3, prompts, tmp_path):
    out = run(sd3, prompts, "null", **{"data.root": tmp_path / "root"})
    assert out == tmp_path / "root"
    assert len(rows(out)) == 3


def test_a_changed_recipe_is_refused(sd3, prompts, tmp_path):
    out = run(sd3, prompts, tmp_path / "data", **{"make_data.num_images": 1})
    with pytest.raises(ValueError, match="another recipe.*seed"):
        run(sd3, prompts, out, **{"make_data.num_images": 2, "make_data.seed": 1})
    foreign = tmp_path / "foreign"
    (foreign / "images").mkdir(parents=True)
    (foreign / "images" / "0000000.png").write_bytes(b"x")
    with pytest.raises(ValueError, match="not written by swd make-data"):
        run(sd3, prompts, foreign)


def test_bad_inputs_give_clear_errors(sd3, prompts, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n   \n")
    cases = [
        (overrides(sd3, tmp_path / "nope.txt", tmp_path / "o"), "prompt file .*nope.txt does not exist"),
        (overrides(sd3, empty, tmp_path / "o"), "holds no prompts"),
        (overrides(sd3, "null", tmp_path / "o"), "set make_data.prompts=FILE"),
        (overrides(sd3, prompts, "null"), "no output folder"),
        (overrides(sd3, prompts, tmp_path / "o", **{"make_data.num_images": 0}), "num_images must be >= 1"),
        (overrides(sd3, prompts, tmp_path / "o", **{"model.pretrained": "null", "checkpoint": "teacher"}), "class-conditioned: it takes no make_data.prompts"),
        (overrides(sd3, "null", tmp_path / "o", **{"model.pretrained": "null", "checkpoint": "teacher"}), "class-conditioned: set make_data.num_images"),
    ]
    for args, message in cases:
        assert main(["make-data", *args]) == 1
        assert re.search(message, capsys.readouterr().err), message
    assert not (tmp_path / "o" / "metainfo.csv").exists()


def test_shards_partition_the_missing_indices():
    missing = [0, 3, 4, 7, 8, 9, 12]
    shares = [shard(missing, r, 3) for r in range(3)]
    assert sorted(sum(shares, [])) == missing
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_a_class_teacher_writes_a_labelled_folder_that_distill_reads(tmp_path):
    """The paper's recipe for a class-conditioned teacher: image i has class i % num_classes."""
    teacher = tmp_path / "teacher"
    torch.manual_seed(0)
    save_denoiser(build_denoiser(ModelConfig(**TINY_MODEL)), teacher, ModelConfig(**TINY_MODEL))
    out = tmp_path / "data"
    swd_in_process("make-data", f"checkpoint={teacher}", f"make_data.output_dir={out}", "make_data.num_images=12",
                   "make_data.batch_size=5", "teacher.steps=2", "device=cpu")
    table = rows(out)
    assert [int(r["label"]) for r in table] == [i % 10 for i in range(12)]
    assert table[3]["caption"] == "class 3"
    data = ImageLabelFolder(out, 32, num_classes=10)
    item = data[11]
    assert item["label"] == 1 and item["image"].shape == (1, 32, 32) and -1 <= float(item["image"].min())
    assert len(np.unique(pixels(out, 0))) > 2  # a sampled image, not a constant
    # distill reads it: data.kind=folder with a class-conditioned model takes the label column
    run_dir = tmp_path / "run"
    swd_in_process("distill", f"distill.teacher={teacher}", f"output_dir={run_dir}", "distill.steps=1", "distill.batch_size=4",
                   "distill.lora.rank=4", "distill.critic.updates=1", "distill.sample_every=0", "device=cpu",
                   "data.kind=folder", f"data.root={out}")
    assert (run_dir / "checkpoints" / "latest").is_file()
    with pytest.raises(ValueError, match="label '12' is not an integer in 0..9"):
        bad = tmp_path / "bad"
        bad.mkdir()
        Image.new("L", (32, 32)).save(bad / "a.png")
        (bad / "metainfo.csv").write_text("index,file_name,caption,label\n0,a.png,class 12,12\n")
        ImageLabelFolder(bad, 32, num_classes=10)
    with pytest.raises(ValueError, match="no 'label' column"):
        (bad / "metainfo.csv").write_text("index,file_name,caption\n0,a.png,a caption\n")
        ImageLabelFolder(bad, 32, num_classes=10)

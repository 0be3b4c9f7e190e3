"""``swd eval`` for text-conditioned models and diffusers pipelines: prompt files, FID against a
folder or published statistics (.npz), CLIP score, precision / recall / density / coverage.

Inception costs ~0.3 s per image on CPU: every set here holds 8 images or fewer, at 16 px.
"""

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torchmetrics.functional.multimodal.clip_score import _clip_score_update
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

from conftest import swd, tiny_overrides
from swd.commands import run_eval, summary_line
from swd.config import load_config
from swd.data import to_uint8
from swd.metrics.clip import CLIPScorer
from swd.metrics.diversity import PRDC_KEYS, equal_size_subset, precision_recall
from swd.metrics.fid import FIDReference, InceptionV3Features, fid_from_features, inception_features, resize_images
from swd.metrics.reference import files_fingerprint, image_files, load_images, load_reference, reference_for_folder, write_fid_statistics
from swd.prompts import read_prompts
from tiny_pipelines import make_clip_tokenizer, tiny_sd3_pipeline

RESOLUTION = 16
NUM_IMAGES = 8
CAPTIONS = ["a red car", "a blue house", "a green tree"]
TEXT_KEYS = ["name", "mode", "steps", "guidance", "nfe", "fid", "clip_score", "precision", "recall", "density", "coverage",
             "seconds_per_image", "num_samples", "num_prompts", "reference", "resolution", "checkpoint", "device"]


# the Inception helpers of the FID tests: the counting wrapper, one thread, one loaded Inception
from test_fid import CountingFeatures, inception, single_thread  # noqa: E402,F401  (fixtures by import)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """One FID cache for the module: the folder's statistics are computed once."""
    return tmp_path_factory.mktemp("fid-cache")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Eight 32x32 RGB images in images/ (searched recursively) with a metainfo.csv, so the same
    folder is a reference and a caption training set."""
    root = tmp_path_factory.mktemp("folder")
    (root / "images").mkdir()
    rows = []
    for i in range(NUM_IMAGES):
        y, x = np.mgrid[0:32, 0:32]
        base = np.stack([(x * (i + 1) * 7) % 256, (y * (i + 2) * 5) % 256, np.full_like(x, 30 * i)], axis=-1)
        noise = np.random.RandomState(i).randint(0, 40, (32, 32, 3))
        Image.fromarray(np.clip(base + noise, 0, 255).astype("uint8")).save(root / "images" / f"{i}.png")
        rows.append([i, f"images/{i}.png", CAPTIONS[i % len(CAPTIONS)]])
    with (root / "metainfo.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["index", "file_name", "caption"])
        writer.writerows(rows)
    return root


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A tiny random CLIP (model, tokenizer, image processor) saved with save_pretrained; nothing downloads."""
    path = make_clip_tokenizer(tmp_path_factory.mktemp("clip"))
    tokenizer = CLIPTokenizer.from_pretrained(path)
    text = dict(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.eos_token_id)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8)
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return path


# ----------------------------------------------------------------------------- prompt files


def test_prompt_files_txt_and_csv(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("a red car\n\n  flag: France  \n")
    assert read_prompts(txt, "eval.prompts") == ["a red car", "flag: France"]
    coco = tmp_path / "coco.csv"
    coco.write_text('image_id,id,caption\n1,10,"A man, riding a horse."\n2,11,\n3,12,A cat\n', encoding="utf-8-sig")
    assert read_prompts(coco, "eval.prompts") == ["A man, riding a horse.", "A cat"]  # blank cells skipped, BOM ignored
    mjhq = tmp_path / "mjhq.csv"
    mjhq.write_text("category,Prompt\npeople,a portrait\nanimals,a dog\n")
    assert read_prompts(mjhq, "eval.prompts") == ["a portrait", "a dog"]


@pytest.mark.parametrize("name, text, error, message", [
    ("cols.csv", "id,url\n1,http://x\n", ValueError, "has no caption or prompt column .*'id', 'url'.*name the column"),
    ("empty.csv", "", ValueError, "empty.csv is empty; a .csv needs a header row"),
    ("header.csv", "caption\n", ValueError, "holds no prompts"),
    ("empty.txt", "\n \n", ValueError, "holds no prompts .*eval.prompts"),
    ("missing.txt", None, FileNotFoundError, "missing.txt does not exist \\(eval.prompts: a .txt file"),
])
def test_prompt_files_bad_input(tmp_path, name, text, error, message):
    if text is not None:
        (tmp_path / name).write_text(text)
    with pytest.raises(error, match=message):
        read_prompts(tmp_path / name, "eval.prompts")


# ----------------------------------------------------------------------------- references


def test_reference_folder_npz_round_trip_gives_the_same_fid(folder, inception, cache_dir, tmp_path):
    options = dict(cache_dir=cache_dir, progress=False, feature=inception)
    reference = reference_for_folder(folder, RESOLUTION, **options)
    assert reference.num_samples == NUM_IMAGES and reference.features.shape == (NUM_IMAGES, 2048)
    assert reference.key.startswith("folder-") and reference.key.endswith(f"-r{RESOLUTION}")
    counting = CountingFeatures(inception)
    path = write_fid_statistics(folder, tmp_path / "stats", RESOLUTION, cache_dir=cache_dir, progress=False, feature=counting)
    assert counting.images_seen == 0 and path.name == "stats.npz"  # the folder's statistics came from the cache
    with np.load(path) as stats:
        assert sorted(stats.files) == ["mu", "sigma"] and stats["sigma"].shape == (2048, 2048)
    published = load_reference(path)
    assert published.features is None and published.num_samples is None

    real = load_images(image_files(folder), RESOLUTION)  # (8, 3, 16, 16)
    fake = (real.flip(-1) + 0.3 * torch.randn(real.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    features = inception_features(fake, progress=False, feature=inception)
    fid = fid_from_features(features, reference)
    assert fid > 1.0
    assert fid_from_features(features, published) == pytest.approx(fid, rel=1e-6, abs=1e-6)

    (folder / "images" / "0.png").touch()
    assert files_fingerprint(folder, image_files(folder)) == reference.fingerprint  # same names and bytes: the same key
    Image.new("RGB", (32, 32), (9, 9, 9)).save(tmp_path / "other.png")
    assert files_fingerprint(tmp_path, image_files(tmp_path)) != reference.fingerprint


def test_folder_images_are_rgb_in_range_and_resized(folder, tmp_path):
    Image.new("L", (40, 24), 255).save(tmp_path / "grey.png")
    image = load_images([tmp_path / "grey.png"], None)
    assert image.shape == (1, 3, 24, 40) and torch.all(image == 1.0)
    assert load_images(image_files(folder)[:2], RESOLUTION).shape == (2, 3, RESOLUTION, RESOLUTION)
    torch.testing.assert_close(resize_images(image, RESOLUTION), torch.ones(1, 3, RESOLUTION, RESOLUTION))


def test_bad_references_are_refused(tmp_path):
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match="holds no images .*searched recursively"):
        load_reference(empty)
    with pytest.raises(FileNotFoundError, match="eval.reference .*nope does not exist; set eval.reference=DIR"):
        load_reference(tmp_path / "nope")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    Image.new("RGB", (32, 32)).save(mixed / "a.png")
    Image.new("RGB", (48, 32)).save(mixed / "b.jpg")
    with pytest.raises(ValueError, match="2 different sizes .*set eval.resolution=N"):
        load_reference(mixed, cache_dir=tmp_path / "cache")

    np.savez(tmp_path / "means.npz", mean=np.zeros(2048), cov=np.eye(2048))
    with pytest.raises(ValueError, match="has no mu or sigma .*'mean', 'cov'"):
        load_reference(tmp_path / "means.npz")
    np.savez(tmp_path / "small.npz", mu=np.zeros(64), sigma=np.eye(64))
    with pytest.raises(ValueError, match="mu \\(64,\\), sigma \\(64, 64\\); swd's FID uses 2048-d"):
        FIDReference.from_npz(tmp_path / "small.npz")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_reference(tmp_path / "gone.npz")


# ----------------------------------------------------------------------------- CLIP score, precision / recall


class ProjectedCLIP(nn.Module):
    """transformers 5 CLIPModel as torchmetrics 1.9 expects it: feature methods returning tensors."""

    def __init__(self, model: CLIPModel) -> None:
        super().__init__()
        self.model = model
        self.config = model.config

    def get_image_features(self, *args, **kwargs) -> torch.Tensor:
        return self.model.get_image_features(*args, **kwargs).pooler_output

    def get_text_features(self, *args, **kwargs) -> torch.Tensor:
        return self.model.get_text_features(*args, **kwargs).pooler_output


def test_clip_score_with_a_tiny_random_clip(tiny_clip):
    scorer = CLIPScorer(tiny_clip)
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    prompts = ["a red car", "a cat", "the sky", "a green tree in the city"]
    scores = scorer.pair_scores(images, prompts)
    assert scores.shape == (4,) and torch.all((0 <= scores) & (scores <= 100))
    assert 0 <= scorer.score(images, prompts) <= 100 and scorer.score(images, prompts) == pytest.approx(float(scores.mean()), abs=1e-5)
    torch.testing.assert_close(scorer.pair_scores(images, prompts, batch_size=1), scores, atol=1e-4, rtol=0)  # batch-independent
    # the same image with the same prompt scores the same, wherever it sits in the batch
    same = scorer.pair_scores(images[:1].repeat(3, 1, 1, 1), [prompts[0]] * 3)
    torch.testing.assert_close(same, scores[:1].repeat(3), atol=1e-4, rtol=0)
    image, text = scorer.embeddings(images, prompts)
    torch.testing.assert_close(image.norm(dim=-1), torch.ones(4))
    # torchmetrics' per-pair score (100 cos), floored at 0
    reference, _ = _clip_score_update(list(to_uint8(images)), prompts, ProjectedCLIP(scorer.model), scorer.processor)
    torch.testing.assert_close(scores, reference.detach().clamp(min=0), atol=1e-4, rtol=0)
    with pytest.raises(FileNotFoundError, match="not a CLIP directory"):
        CLIPScorer(tiny_clip / "nope")


def test_precision_recall_of_a_set_against_itself_and_a_shifted_set():
    real = torch.randn(40, 32, generator=torch.Generator().manual_seed(0))
    same = precision_recall(real, real.clone())
    assert same["precision"] == 1.0 and same["recall"] == 1.0 and same["coverage"] == 1.0
    assert set(same) == set(PRDC_KEYS)
    shifted, far = precision_recall(real, real + 1.5), precision_recall(real, real + 3.0)
    assert 0 < shifted["precision"] < 0.2 and 0 < shifted["recall"] < 0.2 and shifted["density"] < same["density"]
    assert far == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}
    collapsed = precision_recall(real, 0.2 * real)  # all near the mean: faithful, not diverse
    assert collapsed["precision"] == 1.0 and collapsed["recall"] == 0.0
    assert len(equal_size_subset(torch.randn(100, 4), 20)) == 20  # compared at equal set sizes
    with pytest.raises(ValueError, match="at least 7 images on each side, got 6 generated .*raise eval.num_samples"):
        precision_recall(real, real[:6])


# ----------------------------------------------------------------------------- swd eval end to end


def eval_args(checkpoint, out, *extra):
    return ["eval", f"checkpoint={checkpoint}", f"output_dir={out}", "eval.mode=scalewise", f"eval.num_samples={NUM_IMAGES}",
            f"eval.batch_size={NUM_IMAGES}", f"eval.fid_batch_size={NUM_IMAGES}", f"eval.resolution={RESOLUTION}", "device=cpu", *extra]


def test_text_model_eval_through_the_cli(folder, tiny_clip, cache_dir, tmp_path, monkeypatch):
    model = tmp_path / "run" / "model"
    swd("pretrain", *tiny_overrides(), "model.conditioning=text", "model.text_encoder=minilm", "model.in_channels=3",
        "model.max_text_length=8", "data.kind=folder", f"data.root={folder}", f"output_dir={tmp_path / 'run'}", "pretrain.steps=2",
        "pretrain.batch_size=4", "pretrain.sample_every=0", "pretrain.checkpoint_every=2", "device=cpu")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red car\n\na blue house\na green tree\n")
    monkeypatch.setenv("SWD_CACHE_DIR", str(cache_dir))  # the folder's statistics from the round-trip test are reused
    proc = swd(*eval_args(model, tmp_path / "e", f"eval.prompts={prompts}", f"eval.reference={folder}", f"eval.clip={tiny_clip}"))
    missing = swd(*eval_args(model, tmp_path / "x", f"eval.reference={folder}"), check=False)
    record = json.loads((tmp_path / "e" / "eval.json").read_text())
    assert list(record) == TEXT_KEYS
    assert record["num_samples"] == NUM_IMAGES and record["num_prompts"] == 3 and record["steps"] == 4
    assert record["fid"] > 0 and 0 <= record["clip_score"] <= 100 and record["seconds_per_image"] > 0
    assert all(0 <= record[key] <= 1 for key in ("precision", "recall", "coverage")) and record["density"] >= 0
    assert record["reference"] == str(folder) and record["resolution"] == RESOLUTION and record["device"] == "cpu"
    assert record["checkpoint"] == str(model)
    summary = [line for line in proc.stdout.splitlines() if line.startswith("scalewise: FID")]
    assert summary and all(word in summary[0] for word in ("CLIP", "precision", "recall", "ms/image")), proc.stdout
    assert missing.returncode != 0 and missing.stderr.strip().splitlines()[-1] == (
        "swd eval: error: this model is text-conditioned: set eval.prompts=FILE "
        "(a .txt, one prompt per line, or a .csv with a caption or prompt column)")

    config = load_config(None, [f"checkpoint={model}", "device=cpu", f"eval.prompts={prompts}"])
    with pytest.raises(ValueError, match="no default FID reference: set eval.reference=DIR .* or eval.reference=FILE.npz"):
        run_eval(config)
    (model / "prompts.txt").write_text("a red car\n")  # a model's own default prompts stand in for eval.prompts
    with pytest.raises(ValueError, match="no default FID reference"):  # past the prompts check
        run_eval(load_config(None, [f"checkpoint={model}", "device=cpu"]))


def test_sd3_pipeline_eval_against_npz_statistics_with_an_extra_scorer(folder, cache_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SWD_CACHE_DIR", str(cache_dir))
    stats = write_fid_statistics(folder, tmp_path / "stats.npz", RESOLUTION, progress=False)
    pipeline = tiny_sd3_pipeline(tmp_path / "sd3")
    seen = []

    def count_prompts(images, prompts):  # the hook for extra scorers: images and their prompts
        seen.append((images.shape, list(prompts)))
        return {"distinct_prompts": len(set(prompts))}

    config = load_config(None, [f"model.pretrained={pipeline}", "model.max_text_length=16", "schedule.sizes=[8,12,16]",
                                "schedule.sigmas=[1.0,0.8,0.6,0.0]", "eval.mode=scalewise", "eval.num_samples=4", "eval.batch_size=4",
                                "eval.fid_batch_size=4", f"eval.reference={stats}", f"eval.resolution={RESOLUTION}",
                                f"output_dir={tmp_path / 'e'}", "device=cpu"])
    record = run_eval(config, name="sd3", prompts=CAPTIONS[:2], scorers=[count_prompts])
    assert seen == [(torch.Size([4, 3, 32, 32]), ["a red car", "a blue house"] * 2)]  # latents 16 -> 32 px
    assert record == json.loads((tmp_path / "e" / "eval.json").read_text())
    assert record["fid"] > 0 and record["clip_score"] is None and record["num_prompts"] == 2 and record["distinct_prompts"] == 2
    assert all(record[key] is None for key in PRDC_KEYS) and "npz reference holds only mu / sigma" in record["note"]
    assert record["checkpoint"] == str(pipeline) and record["reference"] == str(stats)
    assert "precision n/a | recall n/a" in summary_line(record) and "CLIP" not in summary_line(record)


def test_text_alignment_script_equals_swd_eval(folder, cache_dir, tmp_path, monkeypatch):
    """scripts/text_alignment.py is the quick half of swd eval: the same prompts, seed and scorer, so
    the same subcategory accuracy and retrieval, without Inception."""
    import importlib.util

    from conftest import ROOT, TINY_MODEL
    from swd.config import ModelConfig
    from swd.metrics.twemoji_scorer import load_scorer
    from swd.models import build_denoiser, save_denoiser

    spec = importlib.util.spec_from_file_location("text_alignment", ROOT / "scripts" / "text_alignment.py")
    text_alignment = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(text_alignment)
    model = tmp_path / "run" / "model"
    swd("pretrain", *tiny_overrides(), "model.conditioning=text", "model.text_encoder=minilm", "model.in_channels=3",
        "model.max_text_length=8", "data.kind=folder", f"data.root={folder}", f"output_dir={tmp_path / 'run'}", "pretrain.steps=2",
        "pretrain.batch_size=4", "pretrain.sample_every=0", "pretrain.checkpoint_every=2", "device=cpu")
    captions = load_scorer().captions[:3]
    (model / "prompts.txt").write_text("\n".join(captions) + "\n")  # the model's own default prompts
    quick = text_alignment.alignment(str(model), num_samples=6, mode="scalewise", batch_size=6)
    monkeypatch.setenv("SWD_CACHE_DIR", str(cache_dir))
    full = run_eval(load_config(None, [f"checkpoint={model}", "device=cpu", "eval.mode=scalewise", "eval.num_samples=6",
                                       "eval.batch_size=6", "eval.fid_batch_size=6", "eval.pr_k=3", f"eval.reference={folder}",
                                       f"eval.resolution={RESOLUTION}", "eval.twemoji_scorer=shipped"]))
    assert quick["mode"] == "scalewise" and quick["num_samples"] == 6
    for key in ("subcategory_accuracy", "retrieval_top1", "retrieval_top5"):
        assert quick[key] == full[key], key
    assert quick["schedule"]["sizes"] == [[s, s] for s in (16, 20, 24, 32)]  # the config's default schedule
    constant = text_alignment.alignment(str(model), num_samples=2, mode="scalewise", batch_size=2,
                                        overrides=("schedule.sizes=[32,32,32,32]",))
    assert constant["schedule"]["sizes"] == [[32, 32]] * 4  # --set reaches the sampler
    classes = tmp_path / "classes"
    cfg = ModelConfig(**TINY_MODEL)
    save_denoiser(build_denoiser(cfg), classes, cfg)
    with pytest.raises(ValueError, match="class-conditional"):
        text_alignment.alignment(str(classes), num_samples=2)

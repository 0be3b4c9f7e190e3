import csv
import gzip
import hashlib
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from swd import data
from swd.data import (
    FASHION_MNIST_CLASSES,
    FashionMNIST,
    ImageCaptionFolder,
    collate,
    fashion_mnist_images,
    from_uint8,
    load_fashion_mnist,
    read_idx,
    to_uint8,
)

DEBIAN_DIR = Path(data.DEFAULT_FASHION_MNIST_DIR)


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as a gzip-compressed idx file (magic 0x08 0x<ndim>)."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Keep every test away from the user's cache and environment."""
    monkeypatch.setenv("SWD_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("SWD_FASHION_MNIST_DIR", raising=False)


# ----------------------------------------------------------------------------- Fashion-MNIST


def test_classes():
    assert len(FASHION_MNIST_CLASSES) == 10 and FASHION_MNIST_CLASSES[9] == "Ankle boot"


def test_load_fashion_mnist_raw():
    images, labels = load_fashion_mnist("test")
    assert images.shape == (10000, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (10000,) and labels.dtype == torch.int64
    assert torch.bincount(labels).tolist() == [1000] * 10


def test_fashion_mnist_images_shape_range_padding():
    images, labels = fashion_mnist_images("test")
    raw, raw_labels = load_fashion_mnist("test")
    assert images.shape == (10000, 1, 32, 32) and images.dtype == torch.float32
    assert images.min() == -1 and images.max() == 1
    assert torch.equal(labels, raw_labels)
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert (images[:, 0, border] == -1).all()  # padding is the background value
    assert torch.equal(to_uint8(images[:, 0, 2:30, 2:30]), raw)  # the centre is the original image


def test_uint8_round_trip():
    levels = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(to_uint8(from_uint8(levels)), levels)
    assert from_uint8(levels)[0] == -1 and from_uint8(levels)[-1] == 1
    assert torch.equal(to_uint8(torch.tensor([-3.0, 3.0])), torch.tensor([0, 255], dtype=torch.uint8))


def test_dataset_items():
    dataset = FashionMNIST("test")
    item = dataset[0]
    assert len(dataset) == 10000 and FashionMNIST.num_classes == 10
    assert item["image"].shape == (1, 32, 32) and isinstance(item["label"], int)
    batch = next(iter(DataLoader(dataset, batch_size=5, collate_fn=collate)))
    assert batch["image"].shape == (5, 1, 32, 32) and batch["label"].dtype == torch.int64


def test_unknown_split():
    with pytest.raises(ValueError, match="unknown Fashion-MNIST split 'val'"):
        load_fashion_mnist("val")


def write_test_split(folder: Path, n: int = 8) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    write_idx(folder / "t10k-images-idx3-ubyte.gz", np.zeros((n, 28, 28), np.uint8))
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", np.arange(n, dtype=np.uint8) % 10)


def test_root_and_env_override(tmp_path, monkeypatch):
    write_test_split(tmp_path / "fm", n=8)
    images, labels = load_fashion_mnist("test", root=str(tmp_path / "fm"))
    assert images.shape == (8, 28, 28) and labels.tolist() == list(range(8))
    monkeypatch.setenv("SWD_FASHION_MNIST_DIR", str(tmp_path / "fm"))
    assert load_fashion_mnist("test")[0].shape == (8, 28, 28)


def test_corrupt_gzip_is_named(tmp_path):
    write_test_split(tmp_path)
    bad = tmp_path / "t10k-images-idx3-ubyte.gz"
    bad.write_bytes(b"this is not gzip")
    with pytest.raises(ValueError, match=f"{bad}.*not a valid gzip"):
        load_fashion_mnist("test", root=str(tmp_path))


def test_truncated_gzip_is_named(tmp_path):
    write_test_split(tmp_path)
    bad = tmp_path / "t10k-images-idx3-ubyte.gz"
    bad.write_bytes(bad.read_bytes()[:-12])
    with pytest.raises(ValueError, match=str(bad)):
        load_fashion_mnist("test", root=str(tmp_path))


def test_truncated_payload_and_bad_magic(tmp_path):
    path = tmp_path / "images.gz"
    header = bytes([0, 0, 8, 3]) + b"".join(d.to_bytes(4, "big") for d in (5, 28, 28))
    path.write_bytes(gzip.compress(header + bytes(28 * 28 * 4)))  # one image short
    with pytest.raises(ValueError, match=f"{path}.*truncated or corrupt"):
        read_idx(path, 2051)
    write_idx(path, np.zeros(5, np.uint8))  # a labels file where images are expected
    with pytest.raises(ValueError, match=f"{path} has idx magic number 2049, expected 2051"):
        read_idx(path, 2051)


def test_missing_files_message(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist") as info:
        load_fashion_mnist("test", root=str(tmp_path / "nowhere"))
    assert "SWD_FASHION_MNIST_DIR" in str(info.value) and "download=True" in str(info.value)


def test_download_offline_message(tmp_path, monkeypatch):
    def offline(url, filename):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlretrieve", offline)
    with pytest.raises(RuntimeError, match="offline") as info:
        load_fashion_mnist("test", root=str(tmp_path / "fm"), download=True)
    assert "apt-get install dataset-fashion-mnist" in str(info.value)
    assert list((tmp_path / "fm").glob("*.part")) == []  # no partial files left behind


def test_download_checks_md5_and_loads(tmp_path, monkeypatch):
    """A fake network serving the Debian files; their MD5s stand in for the official ones."""
    names = data.fashion_mnist_files("test")

    def serve(url, filename):
        shutil.copy(DEBIAN_DIR / url.rsplit("/", 1)[-1], filename)

    monkeypatch.setattr(urllib.request, "urlretrieve", serve)
    with pytest.raises(RuntimeError, match="MD5 mismatch"):  # the official MD5s differ from Debian's re-gzip
        load_fashion_mnist("test", root=str(tmp_path / "bad"), download=True)
    local = {name: hashlib.md5((DEBIAN_DIR / name).read_bytes()).hexdigest() for name in names}
    monkeypatch.setattr(data, "FASHION_MNIST_MD5", local)
    images, labels = load_fashion_mnist("test", root=str(tmp_path / "fm"), download=True)
    assert images.shape == (10000, 28, 28) and sorted(p.name for p in (tmp_path / "fm").iterdir()) == sorted(names)


# ----------------------------------------------------------------------------- image-caption folders


def make_folder(root: Path, rows: list[dict] | None = None, header=("index", "file_name", "caption")) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    wide = np.zeros((20, 40, 3), np.uint8)
    wide[:, 20:] = 255  # left half black, right half white
    Image.fromarray(wide).save(root / "wide.png")
    Image.fromarray(np.full((30, 20), 128, np.uint8), mode="L").save(root / "tall.jpg")
    rows = rows if rows is not None else [
        {"index": 0, "file_name": "wide.png", "caption": "a black and white, square"},
        {"index": 1, "file_name": "tall.jpg", "caption": "grey"},
    ]
    with (root / "metainfo.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(header), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return root


def test_image_caption_folder_items(tmp_path):
    dataset = ImageCaptionFolder(make_folder(tmp_path / "set"), size=16)
    assert len(dataset) == 2
    wide, tall = dataset[0], dataset[1]
    assert wide["image"].shape == (3, 16, 16) and wide["image"].dtype == torch.float32
    assert wide["caption"] == "a black and white, square" and tall["caption"] == "grey"
    assert wide["image"].min() >= -1 and wide["image"].max() <= 1
    assert wide["image"][:, :, :4].max() < -0.9 and wide["image"][:, :, -4:].min() > 0.9  # centre crop kept both halves
    assert torch.allclose(tall["image"], torch.full((3, 16, 16), 128 / 127.5 - 1), atol=1 / 127.5)
    grey = ImageCaptionFolder(tmp_path / "set", size=(8, 12), channels=1)[1]["image"]
    assert grey.shape == (1, 8, 12)
    batch = collate([wide, tall])
    assert batch["image"].shape == (2, 3, 16, 16) and batch["caption"] == ["a black and white, square", "grey"]
    dataset.verify()


def test_missing_folder_and_csv(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageCaptionFolder(tmp_path / "nope", size=16)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="metainfo.csv not found"):
        ImageCaptionFolder(tmp_path / "empty", size=16)


def test_missing_column_is_named(tmp_path):
    root = make_folder(tmp_path / "set", header=("index", "file_name", "text"))
    with pytest.raises(ValueError, match=r"no 'caption' column; columns found: \['index', 'file_name', 'text'\]"):
        ImageCaptionFolder(root, size=16)


def test_empty_csv(tmp_path):
    root = make_folder(tmp_path / "set", rows=[])
    with pytest.raises(ValueError, match="header but no rows"):
        ImageCaptionFolder(root, size=16)
    (root / "metainfo.csv").write_text("")
    with pytest.raises(ValueError, match="is empty"):
        ImageCaptionFolder(root, size=16)


def test_missing_image_is_named(tmp_path):
    rows = [{"index": 0, "file_name": "wide.png", "caption": "x"}, {"index": 1, "file_name": "gone.png", "caption": "y"}]
    root = make_folder(tmp_path / "set", rows=rows)
    with pytest.raises(FileNotFoundError, match=f"line 3: image file {root / 'gone.png'} does not exist"):
        ImageCaptionFolder(root, size=16)


def test_empty_caption_is_named(tmp_path):
    rows = [{"index": 0, "file_name": "wide.png", "caption": "x"}, {"index": 1, "file_name": "tall.jpg", "caption": "  "}]
    root = make_folder(tmp_path / "set", rows=rows)
    with pytest.raises(ValueError, match=r"line 3 \(tall.jpg\): empty caption"):
        ImageCaptionFolder(root, size=16)


def test_corrupt_image_is_named(tmp_path):
    root = make_folder(tmp_path / "set")
    (root / "tall.jpg").write_bytes(b"not an image at all")
    dataset = ImageCaptionFolder(root, size=16)
    assert dataset[0]["image"].shape == (3, 16, 16)
    with pytest.raises(ValueError, match=f"cannot read image {root / 'tall.jpg'}"):
        dataset[1]
    with pytest.raises(ValueError, match=f"cannot read image {root / 'tall.jpg'}"):
        dataset.verify()


def test_truncated_png_fails_verify(tmp_path):
    root = make_folder(tmp_path / "set")
    png = (root / "wide.png").read_bytes()
    (root / "wide.png").write_bytes(png[: len(png) // 2])
    with pytest.raises(ValueError, match=f"cannot read image {root / 'wide.png'}"):
        ImageCaptionFolder(root, size=16).verify()


def test_bad_arguments(tmp_path):
    root = make_folder(tmp_path / "set")
    with pytest.raises(ValueError, match="channels must be 1"):
        ImageCaptionFolder(root, size=16, channels=4)
    with pytest.raises(ValueError, match="size must be"):
        ImageCaptionFolder(root, size=(16, 0))


def test_collate_rejects_mixed_keys_and_types():
    with pytest.raises(ValueError, match="different keys"):
        collate([{"image": torch.zeros(1)}, {"label": 1}])
    with pytest.raises(TypeError, match="cannot batch 'x'"):
        collate([{"x": 1.5}])
    assert collate([{"label": 3}, {"label": 4}])["label"].tolist() == [3, 4]

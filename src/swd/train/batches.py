"""Training data in a fixed order: the data set a config names and the batch at each step."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from ..config import DataConfig, ModelConfig
from ..data import FashionMNIST, ImageCaptionFolder, ImageLabelFolder, collate


def build_dataset(data: DataConfig, model: ModelConfig) -> Dataset:
    """The training set a config names, checked against the model it feeds."""
    if data.kind == "fashion_mnist":
        if model.conditioning != "class" or model.in_channels != 1 or model.sample_size != 32:
            raise ValueError(
                "data.kind=fashion_mnist gives 1-channel 32x32 images with class labels: set "
                "model.conditioning=class, model.in_channels=1, model.sample_size=32"
            )
        return FashionMNIST("train", root=data.root, download=data.download)
    if data.kind == "folder":
        if not data.root:
            raise ValueError("data.kind=folder needs data.root: a folder of images with metainfo.csv (index,file_name,caption)")
        if model.conditioning == "class":  # a labelled folder, e.g. a class-conditioned teacher's samples (swd make-data)
            dataset = ImageLabelFolder(data.root, model.sample_size, model.num_classes, channels=model.in_channels)
        elif model.conditioning == "text":
            dataset = ImageCaptionFolder(data.root, model.sample_size, channels=model.in_channels)
        else:
            raise ValueError(f"data.kind=folder needs model.conditioning=text (captions) or class (a label column), "
                             f"got {model.conditioning!r}")
        if len(dataset) == 0:
            raise ValueError(f"{data.root}/metainfo.csv lists no images")
        return dataset
    raise ValueError(f"unknown data.kind {data.kind!r}; use 'fashion_mnist' or 'folder'")


def batch_indices(step: int, dataset_size: int, batch_size: int, seed: int) -> torch.Tensor:
    """Indices of the global batch at ``step``: epochs of seeded permutations.

    A pure function of the step, so resuming at step k reads exactly the batches an
    uninterrupted run would (the data position is the step).
    """
    start = step * batch_size
    out = []
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), dataset_size)
        perm = torch.randperm(dataset_size, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        take = min(batch_size - len(out), dataset_size - offset)
        out.extend(perm[offset : offset + take].tolist())
    return torch.tensor(out, dtype=torch.long)


def load_batch(dataset: Dataset, step: int, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> dict:
    """This process's share of the global batch at ``step``."""
    if batch_size % world:
        raise ValueError(f"batch_size {batch_size} is not divisible by the {world} processes")
    idx = batch_indices(step, len(dataset), batch_size, seed)
    share = batch_size // world
    return collate([dataset[int(i)] for i in idx[rank * share : (rank + 1) * share]])


def condition_values(batch: dict):
    """The conditioning part of a batch: labels tensor or list of captions."""
    return batch["label"] if "label" in batch else batch["caption"]

"""Encoded training items kept on disk (``data.cache_dir``).

For a pipeline teacher every training item costs a VAE encode per stage size and a pass through
up to three text encoders, all frozen: the result is the same at every epoch. ``EncodedDataset``
computes it once per item and keeps it in ``cache_dir/NNNNNNNN.safetensors`` (written to a
temporary name, then renamed, so an interrupted write is never read back). The cache is only
valid for the teacher, text length and sizes it was made with; ``cache.json`` records them and a
mismatch is an error.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset

from ..models import Denoiser
from ..models.conditioning import Condition
from ..schedule import Size

MANIFEST = "cache.json"


def size_key(size: Size) -> str:
    return f"latent_{size[0]}x{size[1]}"


def check_manifest(directory: Path, manifest: dict) -> None:
    """Write ``cache.json`` on first use; afterwards it must match this run's teacher and sizes."""
    path = directory / MANIFEST
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved != manifest:
            differs = sorted(k for k in set(saved) | set(manifest) if saved.get(k) != manifest.get(k))
            raise ValueError(f"data.cache_dir {directory} was made for another setup (differs in {differs}); use a new data.cache_dir")
        return
    directory.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, path)


class EncodedDataset(Dataset):
    """Items of ``dataset`` as the teacher sees them: latents at every size, prompt embeddings, caption."""

    def __init__(self, dataset: Dataset, model: Denoiser, sizes: Sequence[Size], directory: str | Path, manifest: dict):
        self.dataset = dataset
        self.model = model
        self.sizes = sorted(set(tuple(s) for s in sizes))
        self.directory = Path(directory)
        check_manifest(self.directory, {**manifest, "sizes": [list(s) for s in self.sizes]})

    def __len__(self) -> int:
        return len(self.dataset)

    def path(self, index: int) -> Path:
        return self.directory / f"{index:08d}.safetensors"

    @torch.no_grad()
    def encode(self, index: int) -> dict[str, torch.Tensor]:
        item = self.dataset[index]
        device = next(self.model.transformer.parameters()).device
        image = item["image"][None].to(device)  # (1, C, H, W)
        tensors = {size_key(s): self.model.to_model_space(image, s)[0] for s in self.sizes}
        cond = self.model.condition([item["caption"]] if "caption" in item else torch.tensor([item["label"]]))
        tensors.update(tokens=cond.tokens[0], pooled=cond.pooled[0])
        return {k: v.float().contiguous().cpu() for k, v in tensors.items()}

    def __getitem__(self, index: int) -> dict:
        path = self.path(index)
        if path.is_file():
            tensors = load_file(str(path))
        else:
            tensors = self.encode(index)
            tmp = path.with_name(path.name + ".tmp")
            save_file(tensors, str(tmp))
            os.replace(tmp, path)
        labels = getattr(self.dataset, "labels", None)  # a labelled set (Fashion-MNIST, a labelled folder) or captions
        extra = {"label": int(labels[index])} if labels is not None else {"caption": self.dataset.captions[index]}
        return {**tensors, **extra}


def is_cached(batch: dict) -> bool:
    """Whether a batch comes from :class:`EncodedDataset` (encodings instead of images)."""
    return "tokens" in batch


def cached_condition(batch: dict, device: torch.device) -> Condition:
    return Condition(batch["tokens"].to(device), batch["pooled"].to(device))


def cached_model_space(batch: dict, device: torch.device):
    """A ``to_model_space(images, size)`` that reads the batch's cached latents (``images`` unused)."""
    return lambda _images, size: batch[size_key(tuple(size))].to(device)

"""Pieces every trainer shares: data order, checkpoints, finite-loss checks."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from torch.utils.data import Dataset

from ..config import Config, DataConfig, ModelConfig, config_to_dict
from ..data import FashionMNIST, ImageCaptionFolder, collate

CHECKPOINT_DIR = "checkpoints"
LATEST_FILE = "latest"
STATE_FILE = "swd_state.json"


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
        if model.conditioning != "text":
            raise ValueError("data.kind=folder has captions: set model.conditioning=text and model.text_encoder")
        dataset = ImageCaptionFolder(data.root, model.sample_size, channels=model.in_channels)
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


def check_finite(losses: dict[str, torch.Tensor], step: int, stage: int | None = None) -> None:
    """Stop with a message naming the loss, the step and the stage if any loss is NaN or Inf."""
    for name, value in losses.items():
        if not torch.isfinite(value).all():
            where = f"step {step}" + (f", stage {stage}" if stage is not None else "")
            raise FloatingPointError(
                f"loss {name!r} is {value.item() if value.numel() == 1 else 'non-finite'} at {where}; "
                "the last complete checkpoint is kept. Lower the learning rate or check the data."
            )


# --- checkpoints ---------------------------------------------------------------------------

def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / CHECKPOINT_DIR


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The last COMPLETE checkpoint (the ``latest`` pointer is only written after a full save)."""
    pointer = checkpoint_root(output_dir) / LATEST_FILE
    if not pointer.is_file():
        return None
    path = checkpoint_root(output_dir) / pointer.read_text().strip()
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"{pointer} points at {path}, which is not a complete checkpoint; delete {pointer} to start over")
    return path


def read_state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / STATE_FILE).read_text())


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(accelerator, output_dir: str | Path, step: int, config: Config, keep: int, extra: dict | None = None) -> Path | None:
    """``accelerator.save_state`` into a temporary folder, then rename and move ``latest``.

    A crash at any moment leaves the previous checkpoint and pointer intact.
    """
    root = checkpoint_root(output_dir)
    name = f"step_{step:07d}"
    final, tmp = root / name, root / f".tmp_{name}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state = {"step": step, "config": config_to_dict(config), **(extra or {})}
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        write_atomic(root / LATEST_FILE, name)
        old = sorted(p for p in root.glob("step_*") if p.is_dir() and p != final)
        for stale in old[: max(0, len(old) - (keep - 1))]:
            shutil.rmtree(stale)
    accelerator.wait_for_everyone()
    return final


# Keys that may change between a run and its resumption (length, cadence of logs and saves).
RESUMABLE_CHANGES = {"steps", "checkpoint_every", "sample_every", "log_every", "keep_checkpoints", "max_minutes", "skip_nonfinite", "cache_dir"}


def check_resume_config(saved: dict, current: Config, sections: tuple[str, ...]) -> None:
    """A checkpoint from another model/schedule is an error that names the differing keys."""
    now = config_to_dict(current)
    diffs = []
    for section in sections:
        a, b = saved.get(section, {}), now.get(section, {})
        for key in sorted(set(a) | set(b)):
            if key not in RESUMABLE_CHANGES and a.get(key) != b.get(key):
                diffs.append(f"{section}.{key}: checkpoint {a.get(key)!r} vs now {b.get(key)!r}")
    if diffs:
        raise ValueError("cannot resume: the checkpoint was made with another config (" + "; ".join(diffs) + "). Use another output_dir or the same config.")

"""Image grids and per-step strips as PNG files.

A small grid writer of our own: torchvision (whose ``make_grid`` this mirrors) cannot be installed
beside the pinned CPU torch build.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def make_grid(images: torch.Tensor, nrow: int | None = None, padding: int = 2, pad_value: float = 1.0) -> torch.Tensor:
    """Tile (N, C, H, W) images into one (C, H', W') image, ``nrow`` images per row."""
    n, c, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    grid = torch.full((c, rows * (h + padding) + padding, nrow * (w + padding) + padding), pad_value, dtype=images.dtype)
    for i in range(n):
        r, col = divmod(i, nrow)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[:, top : top + h, left : left + w] = images[i].cpu()
    return grid


def save_image(image: torch.Tensor, path: str | Path, scale: int = 1) -> Path:
    """Save a (C, H, W) image in [-1, 1] as PNG, optionally enlarged ``scale`` times (nearest)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if scale > 1:
        image = F.interpolate(image[None].float(), scale_factor=scale, mode="nearest")[0]
    array = to_uint8(image[None])[0]
    Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(path)
    return path


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None, scale: int = 2) -> Path:
    return save_image(make_grid(images, nrow), path, scale)


def save_strip(steps: Sequence[torch.Tensor], path: str | Path, rows: int = 8, scale: int = 2) -> Path:
    """One column per step, one row per sample: each step's prediction shown at the final size.

    Smaller stages are enlarged with nearest-neighbour so that their real resolution stays visible.
    """
    final = steps[-1].shape[-2:]
    columns = [F.interpolate(s[:rows].float(), size=final, mode="nearest") for s in steps]
    tiles = torch.stack(columns, dim=1).flatten(0, 1)  # (rows * steps, C, H, W)
    return save_grid(tiles, path, nrow=len(steps), scale=scale)

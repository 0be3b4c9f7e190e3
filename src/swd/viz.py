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
from PIL import Image, ImageDraw

from .data import to_uint8


def to_pixels(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8, the levels a PNG stores."""
    return to_uint8(images.cpu()).permute(0, 2, 3, 1).numpy()


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
    array = to_pixels(image[None])[0]
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


def side_by_side(images: list[torch.Tensor], labels: list[str], path: Path, nrow: int = 10, per_row: int | None = None, scale: int = 2) -> Path:
    """Grids next to each other (``per_row`` per line, default all), a caption above each, one PNG."""
    per_row = per_row or len(images)
    tiles = []
    for x in images:
        tile = to_pixels(make_grid(x, nrow)[None])[0]
        img = Image.fromarray(tile[..., 0] if tile.shape[-1] == 1 else tile).convert("RGB")
        tiles.append(img.resize((tile.shape[1] * scale, tile.shape[0] * scale), Image.NEAREST))
    pad, head = 12, 18
    cell_w, cell_h = max(t.size[0] for t in tiles) + pad, max(t.size[1] for t in tiles) + head + pad
    rows = -(-len(tiles) // per_row)
    canvas = Image.new("RGB", (pad + cell_w * min(per_row, len(tiles)), rows * cell_h), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (img, label) in enumerate(zip(tiles, labels)):
        left, top = pad + cell_w * (i % per_row), cell_h * (i // per_row)
        canvas.paste(img, (left, top + head))
        draw.text((left, top + 3), label, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path

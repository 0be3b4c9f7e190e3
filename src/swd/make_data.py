"""``swd make-data``: a synthetic training set sampled from the teacher (spec section 5).

The paper trains on the teacher's own samples (SD3.5-L: 28 steps, guidance 4.5; SD3.5-M: 40 steps,
guidance 4.5; FLUX: 30 steps) with their prompts. This writes them in the layout of the authors'
released training sets, which :class:`swd.data.ImageCaptionFolder` reads (for a class-conditioned
teacher the csv has a fourth column, ``label``, read by :class:`swd.data.ImageLabelFolder`)::

    OUT/images/0000000.png, 0000001.png, ...
    OUT/metainfo.csv        index,file_name,caption
    OUT/make_data.json      the recipe (teacher, prompts, seed, sampler, size)
    OUT/config.yaml         the resolved config

Image ``i`` is prompt ``i % len(prompts)`` sampled from its own noise (seed ``seed + i``), so the
set does not depend on the batch size, the number of processes or how many runs made it (up to
floating-point rounding differences between batch sizes on some devices). Runs resume: an image is
written to a temporary name and renamed, indices already present are skipped, and the CSV is
rewritten from the images present (indices below ``make_data.num_images``; images beyond it stay on
disk, unlisted), so reruns never duplicate rows. A rerun with a different recipe
is refused (the set would mix two distributions). Processes started with ``accelerate launch`` or
``torchrun`` share the missing indices; the main process writes the CSV when all are done.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Sequence

import torch
from accelerate import PartialState
from PIL import Image
from tqdm.auto import tqdm

from .config import Config, save_config
from .data import ImageCaptionFolder, to_uint8
from .generate import conditioned_velocity, model_device
from .models import Denoiser
from .models.conditioning import ConditionValues
from .prompts import read_prompts
from .registry import load_model, model_name, resolve_device
from .sampling import sample_euler
from .schedule import ScaleSchedule, teacher_sigmas

IMAGES = "images"
RECIPE_FILE = "make_data.json"
NAME_DIGITS = 7
IMAGE_NAME = re.compile(rf"^(\d{{{NAME_DIGITS}}})\.png$")
TEMP_SUFFIX = ".tmp"


def image_name(index: int) -> str:
    return f"{index:0{NAME_DIGITS}d}.png"


def present_indices(folder: Path) -> set[int]:
    """Indices of the finished images in ``folder/images`` (temporary files do not count)."""
    images = folder / IMAGES
    if not images.is_dir():
        return set()
    return {int(m.group(1)) for p in images.iterdir() if (m := IMAGE_NAME.match(p.name))}


def shard(indices: Sequence[int], rank: int, world: int) -> list[int]:
    """Process ``rank``'s share of ``indices`` (round-robin, so the shares differ by at most one)."""
    return list(indices[rank::world])


def index_noise(indices: Sequence[int], seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    """(B, *shape) starting noise; image ``i`` draws from its own CPU generator seeded ``seed + i``."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed + i)) for i in indices])


@torch.no_grad()
def sample_images(model: Denoiser, values: ConditionValues, noise: torch.Tensor, steps: int, shift: float, guidance: float) -> torch.Tensor:
    """The teacher's guided Euler ODE from ``noise`` (B, C, h, w) for ``values`` (B captions or labels);
    returns decoded images in [-1, 1]."""
    x = sample_euler(conditioned_velocity(model, values, guidance), noise, teacher_sigmas(steps, shift))  # (B, C, h, w)
    return model.decode(x)


def save_png(image: torch.Tensor, path: Path) -> None:
    """(C, H, W) in [-1, 1] -> PNG, written to a temporary name and renamed (never a partial file)."""
    array = to_uint8(image).permute(1, 2, 0).cpu().numpy()  # (H, W, C)
    picture = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    temp = path.with_name(path.name + TEMP_SUFFIX)
    picture.save(temp, format="PNG")
    os.replace(temp, path)


def class_captions(num_classes: int) -> list[str]:
    """The caption column of a class-conditioned teacher's set: ``class K`` for label K."""
    return [f"class {k}" for k in range(num_classes)]


def write_metainfo(folder: Path, indices: Sequence[int], prompts: list[str], with_labels: bool = False) -> Path:
    """``metainfo.csv`` for ``indices`` in order (replaced atomically); ``with_labels``: add a ``label``
    column (image i has class i % len(prompts), the layout :class:`swd.data.ImageLabelFolder` reads)."""
    path = folder / ImageCaptionFolder.CSV_NAME
    temp = path.with_name(path.name + TEMP_SUFFIX)
    with temp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["index", "file_name", "caption"] + (["label"] if with_labels else []))
        for i in sorted(indices):
            k = i % len(prompts)  # the prompt, and for a class teacher the class
            writer.writerow([i, f"{IMAGES}/{image_name(i)}", prompts[k]] + ([k] if with_labels else []))
    os.replace(temp, path)
    return path


def recipe_of(config: Config, teacher: str, prompts: list[str], size: tuple[int, int], pixels: tuple[int, int]) -> dict:
    """What decides each image: changing any of it in a rerun would mix two data sets."""
    digest = hashlib.sha256("\n".join(prompts).encode("utf-8")).hexdigest()
    return {
        "teacher": teacher,
        "prompts_sha256": digest,
        "num_prompts": len(prompts),
        "seed": config.make_data.seed,
        "steps": config.teacher.steps,
        "shift": config.teacher.shift,
        "guidance": config.teacher.guidance,
        "max_text_length": config.model.max_text_length,
        "latent_size": list(size),
        "pixel_size": list(pixels),
    }


def check_recipe(folder: Path, recipe: dict) -> None:
    path = folder / RECIPE_FILE
    if not path.is_file():
        if present_indices(folder):
            raise ValueError(f"{folder / IMAGES} already holds images but no {RECIPE_FILE}: it was not written by swd make-data; "
                             "use another make_data.output_dir")
        return
    old = json.loads(path.read_text())
    changed = [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in recipe.items() if old.get(k) != v]
    if changed:
        raise ValueError(f"{folder} was made with another recipe ({'; '.join(changed)}); resuming would mix two data sets. "
                         "Use another make_data.output_dir or restore the old settings")


def make_data(config: Config) -> Path:
    """Sample ``make_data.num_images`` teacher images (resuming); returns the folder.

    The teacher is ``checkpoint`` or ``model.pretrained``. A text-conditioned one samples
    ``make_data.prompts``; a class-conditioned one (e.g. ``checkpoint=teacher``) gives image i
    class i % num_classes and the csv a ``label`` column (read by ``data.kind=folder``). It samples
    with ``teacher.steps`` / ``teacher.shift`` / ``teacher.guidance`` at the schedule's final size
    (model space: latents for pipeline teachers; the images are that times the VAE factor).
    """
    cfg = config.make_data
    folder = cfg.output_dir or config.data.root
    if not folder:
        raise ValueError("no output folder: set make_data.output_dir=DIR (or data.root=DIR, where distill will read it)")
    folder = Path(folder)
    if cfg.batch_size < 1:
        raise ValueError(f"make_data.batch_size must be >= 1, got {cfg.batch_size}")

    state = PartialState(cpu=config.device == "cpu")  # as the trainer: device=cpu runs several CPU processes (gloo)
    teacher = model_name(config)
    model = load_model(teacher, config.model, resolve_device(config.device))
    with_labels = model.num_classes is not None
    if with_labels and cfg.prompts is not None:
        raise ValueError(f"{teacher} is class-conditioned: it takes no make_data.prompts (image i gets class i % "
                         f"{model.num_classes}); leave make_data.prompts unset and give make_data.num_images")
    if with_labels and cfg.num_images is None:
        raise ValueError(f"{teacher} is class-conditioned: set make_data.num_images (image i gets class i % {model.num_classes})")
    prompts = class_captions(model.num_classes) if with_labels else read_prompts(cfg.prompts)
    num_images = len(prompts) if cfg.num_images is None else int(cfg.num_images)
    if num_images < 1:
        raise ValueError(f"make_data.num_images must be >= 1, got {num_images}")
    size = ScaleSchedule.from_config(config.schedule).final_size
    model.check_size(size)
    pixels = model.pixel_size(size)
    recipe = recipe_of(config, str(teacher), prompts, size, pixels)
    check_recipe(folder, recipe)
    state.wait_for_everyone()  # every process has checked the old recipe before it is rewritten

    if state.is_main_process:
        (folder / IMAGES).mkdir(parents=True, exist_ok=True)
        save_config(config, folder / "config.yaml")
        (folder / RECIPE_FILE).write_text(json.dumps(recipe, indent=1))
    state.wait_for_everyone()
    missing = sorted(set(range(num_images)) - present_indices(folder))
    state.wait_for_everyone()  # every process has listed the folder before anyone writes to it
    mine = shard(missing, state.process_index, state.num_processes)

    device = model_device(model)
    bar = tqdm(total=len(mine), desc=f"make-data ({len(missing)} missing of {num_images}, {state.num_processes} process(es))",
               unit="image", disable=not state.is_main_process)
    for start in range(0, len(mine), cfg.batch_size):
        indices = mine[start : start + cfg.batch_size]
        noise = index_noise(indices, cfg.seed, (model.channels, *size)).to(device)
        values = torch.tensor([i % len(prompts) for i in indices]) if with_labels else [prompts[i % len(prompts)] for i in indices]
        images = sample_images(model, values, noise, config.teacher.steps, config.teacher.shift, config.teacher.guidance)
        for i, image in zip(indices, images):
            save_png(image, folder / IMAGES / image_name(i))
        bar.update(len(indices))
    bar.close()

    state.wait_for_everyone()
    if state.is_main_process:
        for temp in (folder / IMAGES).glob(f"*{TEMP_SUFFIX}"):  # left by an interrupted run
            temp.unlink()
        done = sorted(i for i in present_indices(folder) if i < num_images)
        write_metainfo(folder, done, prompts, with_labels)
    state.wait_for_everyone()
    return folder

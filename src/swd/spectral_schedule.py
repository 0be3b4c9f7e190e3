"""``swd schedule``: recommend a scale-wise schedule from the data's power spectrum.

Orchestration only; the math is in :mod:`swd.spectrum`. The command reads the data a config names
(``data.*``), brings it to the final size in the model's space (pixels for the built-in models, VAE
latents for SD3 / FLUX pipelines, the way :meth:`Denoiser.to_model_space` does for training
targets), measures its spectrum, picks the sigmas (given, or points of the teacher grid) and gives
each step the smallest size that hides at most ``spectral.tolerance`` of its signal above the noise
(or fits ``spectral.token_ratio``). It writes ``schedule.yaml`` (a config snippet), ``schedule.json``
and ``schedule.png`` to ``output_dir``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch
import yaml
from matplotlib import colormaps
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from .config import Config, SpectralScheduleConfig, save_config
from .data import ImageCaptionFolder, fashion_mnist_images
from .models import Denoiser
from .models.pipeline_teachers import LatentCodec
from .registry import load_model_space, resolve_device
from .schedule import ScaleSchedule, Size, as_size, teacher_sigmas
from .spectrum import (
    candidate_sizes, cutoff_frequency, grid_indices, lost_share, mean_power_spectrum, noise_floor, radial_profile,
    sizes_for, sizes_within_budget, token_ratio,
)

NOISE_FLOORS = ("step", "final")
SIGMA_SOURCES = ("schedule", "grid")
DEFAULT_STEPS = 4


@dataclass(frozen=True)
class Geometry:
    """What the model allows: the final size in its space, the multiple every side must be, its VAE."""

    final: Size
    multiple: int  # the patch size (model space; FLUX: its 2x2 packing)
    max_side: int  # the position-embedding limit
    vae_factor: int  # pixels per model-space position (1: pixel space)
    space: str  # "pixels" or "latents"


def check_options(cfg: SpectralScheduleConfig) -> None:
    """Refuse bad ``spectral.*`` values before any data is read, naming the fix."""
    if cfg.steps is not None and cfg.steps < 1:
        raise ValueError(f"spectral.steps must be at least 1, got {cfg.steps}")
    if not 0.0 <= cfg.tolerance < 1.0:
        raise ValueError(f"spectral.tolerance is a share in [0, 1), got {cfg.tolerance}; e.g. 0.2 hides at most 20% of the signal above the noise")
    if cfg.token_ratio is not None and not 0.0 < cfg.token_ratio <= 1.0:
        raise ValueError(f"spectral.token_ratio is a share of the tokens of n full-size steps, in (0, 1], got {cfg.token_ratio}")
    if cfg.sigma_source not in SIGMA_SOURCES:
        raise ValueError(f"spectral.sigma_source must be one of {', '.join(SIGMA_SOURCES)}, got {cfg.sigma_source!r}")
    if cfg.noise_floor not in NOISE_FLOORS:
        raise ValueError(f"spectral.noise_floor must be one of {', '.join(NOISE_FLOORS)}, got {cfg.noise_floor!r}")
    if not 0.0 <= cfg.min_ratio <= 1.0:
        raise ValueError(f"spectral.min_ratio is a share of the final side in [0, 1], got {cfg.min_ratio}")
    if not 0.0 < cfg.last_sigma < 1.0:
        raise ValueError(f"spectral.last_sigma must lie in (0, 1), got {cfg.last_sigma}")
    if cfg.num_images is not None and cfg.num_images < 1:
        raise ValueError(f"spectral.num_images must be at least 1 (or null for every image), got {cfg.num_images}")
    if cfg.batch_size < 1:
        raise ValueError(f"spectral.batch_size must be at least 1, got {cfg.batch_size}")


def with_schedule_sigmas(cfg: SpectralScheduleConfig, schedule_sigmas: list[float]) -> tuple[SpectralScheduleConfig, str]:
    """``cfg`` with the sigmas the command will use given, and where they come from.

    ``spectral.sigmas`` first. Else, with ``spectral.sigma_source=schedule`` (the default), the config's
    ``schedule.sigmas`` when they have the number of steps asked for: only the sizes are derived, at
    the noise levels the distillation already uses. Otherwise the teacher grid (:func:`choose_sigmas`).
    Measured on Fashion-MNIST and Twemoji (results/schedule.json), sizes derived for the paper's
    sigmas distilled better than the same rule with evenly spaced grid sigmas.
    """
    if cfg.sigmas is not None:
        return cfg, "spectral.sigmas"
    steps = len(schedule_sigmas) - 1
    if cfg.sigma_source == "schedule" and (cfg.steps is None or cfg.steps == steps):
        return dataclasses.replace(cfg, sigmas=list(schedule_sigmas)), "schedule.sigmas"
    return cfg, "grid"


def choose_sigmas(cfg: SpectralScheduleConfig, grid: list[float]) -> tuple[list[float], Optional[list[int]]]:
    """The n + 1 sigmas (ending in 0) and their teacher-grid indices (None for given sigmas).

    Given ``spectral.sigmas`` are taken as they are. Otherwise: ``steps`` grid points evenly spaced in
    index from 0 (sigma 1, pure noise, where sampling starts) to the point nearest ``last_sigma``; with
    28 steps and shift 3 and the default 0.6 that is indices 0, 6, 12, 18 for 4 steps and 0, 4, 7, 11,
    14, 18 for 6 (the paper hand-picked 0, 7, 14, 18 and 0, 4, 7, 12, 14, 18).
    """
    if cfg.sigmas is not None:
        n = len(cfg.sigmas) - 1
        if n < 1:
            raise ValueError(f"spectral.sigmas={cfg.sigmas} has no step: n steps take n + 1 sigmas ending in 0, e.g. [1.0, 0.6022, 0.0]")
        if cfg.steps is not None and cfg.steps != n:
            raise ValueError(f"spectral.steps={cfg.steps} but spectral.sigmas has {len(cfg.sigmas)} values, i.e. {n} steps "
                             "(n steps take n + 1 sigmas ending in 0): drop one of them")
        try:
            ScaleSchedule([1] * n, cfg.sigmas)
        except ValueError as err:
            raise ValueError(f"spectral.sigmas: {err}") from None
        return [float(s) for s in cfg.sigmas], None
    steps = DEFAULT_STEPS if cfg.steps is None else cfg.steps
    last = min(range(len(grid) - 1), key=lambda i: abs(grid[i] - cfg.last_sigma))  # never the final 0
    indices = grid_indices(steps, last)
    return [grid[i] for i in indices] + [0.0], indices


def geometry(model: Denoiser, config: Config) -> Geometry:
    """The final size (``spectral.final_size``, else the last of ``schedule.sizes``) checked against the model."""
    final = as_size(config.spectral.final_size if config.spectral.final_size is not None else config.schedule.sizes[-1])
    try:
        model.check_size(final)
    except ValueError as err:
        raise ValueError(f"the final size {final}: {err}; set spectral.final_size (or schedule.sizes) to a size the model takes") from None
    latent = isinstance(model.codec, LatentCodec)
    return Geometry(final, model.patch_size, model.max_side, int(model.codec.factor), "latents" if latent else "pixels")


def model_space_batches(model: Denoiser, config: Config, geo: Geometry, device: torch.device) -> tuple[Iterator[torch.Tensor], int, str]:
    """The clean data in the model's space at the final size, in batches (B, C, H, W), a progress bar
    over them; plus the number of images and a description of the source."""
    cfg, data = config.spectral, config.data
    pixels = model.pixel_size(geo.final)
    channels = model.codec.vae.config.in_channels if isinstance(model.codec, LatentCodec) else model.channels
    if data.kind == "fashion_mnist":
        if channels != 1:
            raise ValueError(f"Fashion-MNIST images have 1 channel but this model's data has {channels}: use data.kind=folder "
                             "with data.root=FOLDER, or a 1-channel model")
        if pixels[0] > 32 or pixels[1] > 32:
            raise ValueError(f"Fashion-MNIST images are 32x32 px, smaller than the {pixels[0]}x{pixels[1]} px the final size "
                             f"{geo.final} needs: lower spectral.final_size")
        images, _ = fashion_mnist_images("train", data.root, data.download)  # (N, 1, 32, 32) in [-1, 1]
        count, source = len(images), "Fashion-MNIST (train)"

        def load(idx: torch.Tensor) -> torch.Tensor:
            return images[idx]  # (B, 1, 32, 32)
    elif data.kind == "folder":
        if not data.root:
            raise ValueError("data.kind=folder needs data.root: a folder of images with metainfo.csv (index,file_name,caption)")
        folder = ImageCaptionFolder(data.root, pixels, channels=channels)
        count, source = len(folder), f"folder {data.root}"

        def load(idx: torch.Tensor) -> torch.Tensor:
            return torch.stack([folder.load_image(int(i)) for i in idx])  # (B, C, h, w)
    else:
        raise ValueError(f"unknown data.kind {data.kind!r}; use 'fashion_mnist' or 'folder'")
    if cfg.num_images is not None and cfg.num_images < count:
        order = torch.randperm(count, generator=torch.Generator().manual_seed(config.seed))[: cfg.num_images]
    else:
        order = torch.arange(count)
    model.codec.to(device)  # only the codec moves: a pipeline's transformer here has no weights

    def batches() -> Iterator[torch.Tensor]:
        for start in tqdm(range(0, len(order), cfg.batch_size), desc="spectrum", unit="batch"):
            x = load(order[start : start + cfg.batch_size]).to(device)  # (B, C, h, w) pixels in [-1, 1]
            yield model.to_model_space(x, geo.final).float().cpu()  # (B, c, H, W)

    return batches(), len(order), source


def step_record(power: torch.Tensor, frequencies: torch.Tensor, profile: torch.Tensor, sigma: float, size: Size, final: Size,
                step_floor: bool) -> dict:
    """One step of a schedule against the spectrum: its Nyquist, both cutoffs, both floors, what it hides."""
    area = size[0] * size[1] / (final[0] * final[1])
    return {
        "sigma": round(sigma, 6),
        "size": list(size),
        "nyquist": round(min(size[0] / final[0], size[1] / final[1]), 6),  # relative to the final size's Nyquist
        "cutoff": round(cutoff_frequency(frequencies, profile, sigma), 6),  # where signal meets sigma^2
        "cutoff_at_size": round(cutoff_frequency(frequencies, profile, sigma, area if step_floor else 1.0), 6),
        "noise_floor": noise_floor(sigma),
        "noise_floor_at_size": noise_floor(sigma, area if step_floor else 1.0),
        "lost_share": round(lost_share(power, sigma, size, step_floor), 6),
    }


def recommend(power: torch.Tensor, cfg: SpectralScheduleConfig, geo: Geometry, grid: list[float]) -> dict:
    """The schedule for a measured spectrum (H, W): sigmas, sizes, and each step against the spectrum."""
    sigmas, indices = choose_sigmas(cfg, grid)
    candidates = candidate_sizes(geo.final, geo.multiple, cfg.min_ratio)
    step_floor = cfg.noise_floor == "step"
    if cfg.token_ratio is None:
        sizes, tolerance = sizes_for(power, sigmas[:-1], candidates, cfg.tolerance, step_floor), cfg.tolerance
    else:
        sizes, tolerance = sizes_within_budget(power, sigmas[:-1], candidates, cfg.token_ratio, step_floor)
    schedule = ScaleSchedule(sizes, sigmas)  # validates: n + 1 sigmas ending in 0, sizes never shrinking
    frequencies, profile = radial_profile(power)
    steps = [step_record(power, frequencies, profile, s, size, geo.final, step_floor) for s, size in zip(sigmas, sizes)]
    for i, step in enumerate(steps):
        step["grid_index"] = None if indices is None else indices[i]
    return {"schedule": schedule, "tolerance": tolerance, "steps": steps, "token_ratio": token_ratio(sizes, geo.final),
            "frequencies": frequencies, "profile": profile}


def reference_record(power: torch.Tensor, config: Config, geo: Geometry) -> Optional[dict]:
    """The config's own ``schedule`` measured the same way (None if its final size differs)."""
    reference = ScaleSchedule.from_config(config.schedule)
    if reference.final_size != geo.final:
        return None
    step_floor = config.spectral.noise_floor == "step"
    return {"sizes": [list(s) for s in reference.sizes], "sigmas": list(reference.sigmas),
            "token_ratio": round(token_ratio(reference.sizes, geo.final), 6),
            "lost_share": [round(lost_share(power, s, size, step_floor), 6) for s, size in zip(reference.sigmas, reference.sizes)]}


def config_snippet(schedule: ScaleSchedule, decimals: int = 4) -> dict:
    """``schedule.sizes`` / ``schedule.sigmas`` as a config accepts them (an int for a square size),
    sigmas rounded to ``decimals`` as the paper publishes them."""
    sizes = [h if h == w else [h, w] for h, w in schedule.sizes]
    snippet = {"sizes": sizes, "sigmas": [round(s, decimals) for s in schedule.sigmas]}
    ScaleSchedule(snippet["sizes"], snippet["sigmas"])  # still valid after rounding
    return {"schedule": snippet}


def run_schedule(config: Config) -> list[Path]:
    """Measure, recommend, write ``schedule.yaml``, ``schedule.json``, ``schedule.png``; print a summary."""
    cfg = config.spectral
    check_options(cfg)
    noise = config.distill.noise  # the teacher grid the distillation draws from (28 steps, shift 3), not teacher.steps
    grid = teacher_sigmas(noise.grid_steps, noise.grid_shift).tolist()
    cfg, sigmas_from = with_schedule_sigmas(cfg, config.schedule.sigmas)
    choose_sigmas(cfg, grid)  # bad sigmas or steps fail before any data is read
    name = config.checkpoint or config.model.pretrained or config.distill.teacher
    device = resolve_device(config.device)
    model = load_model_space(name, config.model)
    geo = geometry(model, config)
    batches, count, source = model_space_batches(model, config, geo, device)
    with torch.no_grad():
        power, measured = mean_power_spectrum(batches)  # (H, W)
    result = recommend(power, cfg, geo, grid)
    schedule = result["schedule"]
    snippet = config_snippet(schedule, 4 if cfg.sigmas is None else 8)  # given sigmas are kept as given
    record = {
        "model": name, "data": {"source": source, "images": measured, "space": geo.space},
        "final_size": list(geo.final), "patch_size": geo.multiple, "vae_factor": geo.vae_factor, "max_side": geo.max_side,
        "teacher_grid": {"steps": noise.grid_steps, "shift": noise.grid_shift},
        "rule": {"noise_floor": cfg.noise_floor, "tolerance": cfg.tolerance, "token_ratio_budget": cfg.token_ratio,
                 "tolerance_used": round(result["tolerance"], 6), "min_ratio": cfg.min_ratio,
                 "last_sigma": cfg.last_sigma if cfg.sigmas is None else None, "sigmas_from": sigmas_from},
        **snippet, "token_ratio": round(result["token_ratio"], 6), "steps": result["steps"],
        "reference": reference_record(power, config, geo),
        "spectrum": {"normalisation": "mean |FFT|^2 of the orthonormal 2-D FFT over images and channels (white noise of "
                                      "variance v is flat at v); frequency relative to the final size's Nyquist",
                     "frequency": [round(float(f), 6) for f in result["frequencies"]],
                     "power": [float(f"{p:.6g}") for p in result["profile"].tolist()]},
    }
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "config.yaml")
    paths = [out / "schedule.yaml", out / "schedule.json", out / "schedule.png"]
    paths[0].write_text(yaml.safe_dump(snippet, default_flow_style=None, sort_keys=False))
    paths[1].write_text(json.dumps(record, indent=1))
    schedule_figure(record, paths[2])
    print(summary(record))
    return paths


def summary(record: dict) -> str:
    """The recommendation as a reader sees it: one line, a table of the steps, the snippet."""
    final, rule = record["final_size"], record["rule"]
    budget = f", token budget {rule['token_ratio_budget']}" if rule["token_ratio_budget"] is not None else ""
    lines = [f"{record['data']['source']}: {record['data']['images']} images, {record['data']['space']} at {final[0]}x{final[1]}; "
             f"noise floor at the {rule['noise_floor']} size, tolerance {rule['tolerance_used']:.3f}{budget}; sigmas from "
             f"{rule['sigmas_from']}",
             "| step | sigma | size | Nyquist | cutoff (final size) | cutoff (step size) | hidden share |", "|---|---|---|---|---|---|---|"]
    for i, s in enumerate(record["steps"]):
        lines.append(f"| {i + 1} | {s['sigma']:.4f} | {s['size'][0]}x{s['size'][1]} | {s['nyquist']:.3f} | {s['cutoff']:.3f} | "
                     f"{s['cutoff_at_size']:.3f} | {s['lost_share']:.3f} |")
    lines.append(f"token ratio {record['token_ratio']:.3f} of {len(record['steps'])} full-size steps")
    ref = record["reference"]
    if ref is not None:
        sizes = "-".join(str(s[0]) if s[0] == s[1] else f"{s[0]}x{s[1]}" for s in ref["sizes"])
        lines.append(f"config's schedule {sizes}: token ratio {ref['token_ratio']:.3f}, hidden shares "
                     + " ".join(f"{v:.3f}" for v in ref["lost_share"]))
    lines.append(yaml.safe_dump({"schedule": record["schedule"]}, default_flow_style=None, sort_keys=False).rstrip())
    return "\n".join(lines)


def schedule_figure(record: dict, path: Path) -> Path:
    """The spectrum against each step's noise floor, with each step's Nyquist frequency."""
    f = torch.tensor(record["spectrum"]["frequency"][1:])  # DC left out (log axis)
    p = torch.tensor(record["spectrum"]["power"][1:])
    final, rule = record["final_size"], record["rule"]
    fig = Figure(figsize=(9, 5.6))  # no pyplot: no backend, no global figure state
    ax = fig.subplots()
    ax.loglog(f, p, color="black", lw=2, label=f"data spectrum P(f) ({record['data']['space']}, {record['data']['images']} images)")
    colors = [colormaps["viridis"](x) for x in torch.linspace(0.05, 0.85, len(record["steps"])).tolist()]
    top = float(p.max()) * 30
    for i, (s, color) in enumerate(zip(record["steps"], colors)):
        h, w = s["size"]
        sigma = s["sigma"]
        if sigma >= 1.0:
            ax.plot([], [], color=color, lw=3, label=f"step {i + 1}: sigma 1 (pure noise), {h}x{w}")
            ax.axvline(s["nyquist"], color=color, ls=":", lw=1.5)
            continue
        scale = (1 - sigma) ** 2  # compare P(f) with floor / (1 - sigma)^2
        at_size, at_final = s["noise_floor_at_size"] / scale, s["noise_floor"] / scale
        hidden = "" if at_final < float(p.max()) else " (all under the noise)"
        ax.plot([f[0], s["nyquist"]], [at_size, at_size], color=color, lw=2.5,
                label=f"step {i + 1}: sigma {sigma:.3f}, {h}x{w}, hides {s['lost_share']:.0%}{hidden}")
        if rule["noise_floor"] == "step" and at_size != at_final:
            ax.axhline(at_final, color=color, ls="--", lw=1)
        ax.fill_between(f, p, at_final, where=p > at_final, interpolate=True, color=color, alpha=0.25, lw=0)  # the signal above the noise
        ax.axvline(s["nyquist"], color=color, ls=":", lw=1.5)
        if 0 < s["cutoff_at_size"] <= s["nyquist"]:
            ax.plot([s["cutoff_at_size"]], [at_size], "o", color=color)
    ax.plot([], [], color="gray", lw=2.5, label="noise floor at the step's size" if rule["noise_floor"] == "step" else "noise floor")
    if rule["noise_floor"] == "step":
        ax.plot([], [], color="gray", ls="--", lw=1, label="noise floor at the final size")
    ax.plot([], [], color="gray", ls=":", lw=1.5, label="Nyquist frequency of the step's size")
    ax.plot([], [], "o", color="gray", label="cutoff: the spectrum meets the step's floor")
    ax.fill_between([], [], [], color="gray", alpha=0.2, lw=0, label="signal above the noise (at the final size)")
    ax.set_ylim(float(p.min()) / 3, top)
    ax.set_xlim(float(f[0]) * 0.9, float(f[-1]) * 1.05)
    ax.set_xlabel(f"frequency (1 = Nyquist frequency of the final size, {final[0]}x{final[1]})")
    ax.set_ylabel("power per frequency bin (orthonormal FFT)\nfloors: noise power / (1 - sigma)^2")
    ratio = record["token_ratio"]
    ax.set_title(f"swd schedule: {record['data']['source']}, {len(record['steps'])} steps, token ratio {ratio:.2f}")
    ax.legend(fontsize=7.5, loc="lower left")
    ax.grid(True, which="major", alpha=0.3)
    fig.text(0.5, 0.01, "Noise hides the frequencies where the spectrum lies under a step's floor; each step takes the smallest size "
             f"that hides at most {rule['tolerance_used']:.0%} of its signal above the noise.", ha="center", fontsize=8)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path

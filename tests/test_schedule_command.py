"""``swd schedule``: the spectrum and cutoff math (swd.spectrum) on spectra with closed forms, the
validity of the schedules it derives, its errors, and the command end to end on tiny folders, in
pixels (the shipped teacher) and in the latents of the tiny SD3 / FLUX pipelines."""

import json
import math

import pytest
import torch
import yaml
from PIL import Image

from conftest import swd_in_process
from swd.config import ModelConfig, load_config
from swd.data import ImageCaptionFolder
from swd.make_data import image_name, write_metainfo
from swd.registry import load_model_space, load_reference
from swd.schedule import ScaleSchedule
from swd.spectrum import (
    candidate_sizes, cutoff_frequency, frequency_grid, grid_indices, lost_share, mean_power_spectrum, power_spectrum,
    radial_profile, sizes_for, sizes_within_budget, token_ratio,
)
from tiny_pipelines import tiny_flux_pipeline, tiny_sd3_pipeline

A = 0.04  # P(f) = A / f^2: the cutoff at sigma is sqrt(A) (1 - sigma) / sigma


def inverse_square(height: int, width: int, a: float = A) -> torch.Tensor:
    """The spectrum A / f^2 (f relative to the final Nyquist) on a (H, W) grid; DC set to 1."""
    fy, fx = frequency_grid(height, width)
    r2 = fy.square() + fx.square()
    r2[0, 0] = 1.0
    power = a / r2
    power[0, 0] = 1.0
    return power


def images_with_spectrum(power: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """(n, 1, H, W) Gaussian images whose expected orthonormal power is ``power``: white noise
    filtered by sqrt(power), which is real and symmetric, so the images are real."""
    eps = torch.randn(n, 1, *power.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return torch.fft.ifft2(torch.fft.fft2(eps, norm="ortho") * power.sqrt(), norm="ortho").real


def closed_form_cutoff(sigma: float, area: float = 1.0) -> float:
    return math.sqrt(A * area) * (1 - sigma) / sigma


# ----------------------------------------------------------------------------- the spectrum


def test_white_noise_is_flat_at_its_variance_and_the_power_averages_to_the_pixel_power():
    x = 0.7 * torch.randn(256, 2, 16, 24, generator=torch.Generator().manual_seed(0))
    power = power_spectrum(x)
    assert power.shape == (16, 24)
    assert float(power.mean()) == pytest.approx(float(x.double().square().mean()), rel=1e-9)  # Parseval
    assert float(power.mean()) == pytest.approx(0.49, rel=0.02)
    assert float((power / 0.49 - 1).abs().max()) < 0.3  # every bin, 512 draws each


def test_a_cosine_puts_its_power_in_its_two_bins():
    n, k0, a = 16, 3, 0.5
    rows = a * torch.cos(2 * math.pi * k0 * torch.arange(n) / n)
    power = power_spectrum(rows[None, None, :, None].expand(1, 1, n, n))
    assert float(power[k0, 0]) == pytest.approx(a**2 * n * n / 4) and float(power[-k0, 0]) == pytest.approx(a**2 * n * n / 4)
    power[k0, 0] = power[-k0, 0] = 0
    assert float(power.abs().max()) < 1e-9  # float32 rounding of the cosine; the peaks are 16


def test_the_spectrum_of_batches_is_the_spectrum_of_all_images():
    x = torch.randn(10, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    power, count = mean_power_spectrum([x[:3], x[3:7], x[7:]])
    assert count == 10 and torch.allclose(power, power_spectrum(x))
    with pytest.raises(ValueError, match="empty"):
        mean_power_spectrum([])


@pytest.mark.parametrize("sigma", [0.2, 0.3, 0.5])
def test_cutoff_of_an_inverse_square_spectrum_has_its_closed_form(sigma):
    frequencies, profile = radial_profile(inverse_square(64, 64))
    assert cutoff_frequency(frequencies, profile, sigma) == pytest.approx(closed_form_cutoff(sigma), rel=0.01)
    # noise drawn at a quarter / half of the area: the floor rises by 4 / 2, the cutoff falls by 2 / sqrt(2)
    for area in (0.25, 0.5):
        assert cutoff_frequency(frequencies, profile, sigma, area) == pytest.approx(closed_form_cutoff(sigma, area), rel=0.02)


def test_measured_inverse_square_images_give_the_closed_form_cutoff():
    power, _ = mean_power_spectrum(images_with_spectrum(inverse_square(32, 48), 400).split(100))
    frequencies, profile = radial_profile(power)
    for sigma in (0.25, 0.4, 0.5):
        assert cutoff_frequency(frequencies, profile, sigma) == pytest.approx(closed_form_cutoff(sigma), rel=0.05)


def test_cutoff_ends():
    frequencies, profile = radial_profile(inverse_square(16, 16))
    assert cutoff_frequency(frequencies, profile, 1.0) == 0.0  # pure noise
    assert cutoff_frequency(frequencies, profile, 0.0) == pytest.approx(float(frequencies[-1]))  # no noise
    assert cutoff_frequency(frequencies, profile, 0.999) == 0.0  # everything under the noise


def test_the_radial_profile_of_a_non_square_grid_averages_each_ring():
    power = torch.arange(12 * 20, dtype=torch.float64).reshape(12, 20)
    frequencies, profile = radial_profile(power)
    fy, fx = frequency_grid(12, 20)
    ring = torch.round((fy.square() + fx.square()).sqrt() / (2 / 12)).long()
    assert frequencies[0] == 0 and float(profile[0]) == 0.0  # DC alone
    for j in (1, 3):
        assert float(profile[j]) == pytest.approx(float(power[ring == j].mean()))


# ----------------------------------------------------------------------------- what a size hides


def lost_share_by_hand(power, sigma, size, step_floor):
    """The definition bin by bin, written out independently of swd.spectrum."""
    height, width = power.shape
    h, w = size
    total = kept = 0.0
    for i in range(height):
        for j in range(width):
            if i == 0 and j == 0:
                continue
            ky, kx = min(i, height - i), min(j, width - j)  # |integer frequency|
            signal = (1 - sigma) ** 2 * float(power[i, j])
            total += max(0.0, signal - sigma**2)
            if ky <= h / 2 and kx <= w / 2:
                floor = sigma**2 * height * width / (h * w) if step_floor else sigma**2
                kept += max(0.0, signal - floor)
    return 0.0 if total == 0 else (total - kept) / total


@pytest.mark.parametrize("step_floor", [True, False])
def test_lost_share_is_the_hidden_excess_over_the_noise(step_floor):
    power = torch.rand(8, 12, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 4
    for sigma in (0.3, 0.5, 0.6):
        for size in ((2, 4), (4, 6), (6, 8), (8, 12)):
            assert lost_share(power, sigma, size, step_floor) == pytest.approx(lost_share_by_hand(power, sigma, size, step_floor), abs=1e-12)
    assert lost_share(power, 0.4, (8, 12), step_floor) == 0.0  # the final size hides nothing
    assert lost_share(power, 1.0, (2, 2), step_floor) == 0.0  # pure noise: nothing to hide
    shares = [lost_share(power, 0.4, (h, h * 3 // 2), step_floor) for h in (2, 4, 6, 8)]
    assert shares == sorted(shares, reverse=True)  # a larger size hides less


def test_with_the_nyquist_rule_the_step_size_sits_at_the_cutoff():
    """noise_floor=final, tolerance 0: a step's Nyquist frequency is where signal meets noise (the issue's idea)."""
    power = inverse_square(64, 64)
    for multiple in (2, 4):
        for sigma in (0.2, 0.3, 0.5):
            (h, w), _ = sizes_for(power, [sigma, 0.0], candidate_sizes((64, 64), multiple), 0.0, step_floor=False)
            fc = closed_form_cutoff(sigma)
            assert h == w and fc - 2 / 64 <= h / 64 < fc + multiple / 64


def test_noise_at_the_step_size_asks_for_more_than_the_nyquist_rule():
    power = inverse_square(32, 32)
    candidates = candidate_sizes((32, 32), 2)
    nyquist = sizes_for(power, [0.4, 0.0], candidates, 0.1, step_floor=False)[0]
    step = sizes_for(power, [0.4, 0.0], candidates, 0.1, step_floor=True)[0]
    assert step[0] > nyquist[0]
    # 1/f^2 data: at any size the step's own cutoff is f_c * h / H, inside its Nyquist frequency
    frequencies, profile = radial_profile(power)
    for h in (8, 16, 24):
        assert cutoff_frequency(frequencies, profile, 0.4, (h / 32) ** 2) < h / 32


# ----------------------------------------------------------------------------- schedules


@pytest.mark.parametrize("final,multiple", [((32, 32), 2), ((24, 32), 2), ((32, 16), 4), ((20, 36), 4)])
def test_candidate_sizes_are_patch_multiples_in_the_final_aspect(final, multiple):
    sizes = candidate_sizes(final, multiple, min_ratio=0.25)
    assert sizes[-1] == final
    assert all(h % multiple == 0 and w % multiple == 0 for h, w in sizes)
    assert all(h <= final[0] and w <= final[1] for h, w in sizes)
    assert all(b[0] >= a[0] and b[1] >= a[1] and b != a for a, b in zip(sizes, sizes[1:]))
    assert all(h >= 0.25 * final[0] - 1e-9 and w >= 0.25 * final[1] - 1e-9 for h, w in sizes)
    for h, w in sizes:  # the final aspect ratio, up to one multiple
        assert abs(h / final[0] - w / final[1]) <= multiple / min(final)


@pytest.mark.parametrize("final,multiple", [((32, 32), 2), ((24, 32), 2), ((32, 16), 4)])
def test_derived_schedules_are_valid(final, multiple):
    power = power_spectrum(images_with_spectrum(inverse_square(*final, a=0.1), 64, seed=5))
    sigmas = [1.0, 0.8959, 0.7371, 0.6022]
    for tolerance in (0.0, 0.1, 0.3):
        for step_floor in (True, False):
            sizes = sizes_for(power, sigmas, candidate_sizes(final, multiple, 0.25), tolerance, step_floor)
            schedule = ScaleSchedule(sizes, sigmas + [0.0])  # n + 1 sigmas, sizes never shrinking
            assert schedule.final_size == final and len(sizes) == 4
            assert all(h % multiple == 0 and w % multiple == 0 and h <= final[0] and w <= final[1] for h, w in sizes)
            assert all(lost_share(power, s, size, step_floor) <= tolerance + 1e-12 for s, size in zip(sigmas, sizes))


def test_a_token_budget_gets_the_smallest_tolerance_that_fits():
    power = power_spectrum(images_with_spectrum(inverse_square(32, 32, a=0.1), 64, seed=2))
    sigmas, candidates = [1.0, 0.8959, 0.7371, 0.6022], candidate_sizes((32, 32), 2, 0.25)
    for budget in (0.35, 0.5, 0.7):
        sizes, tolerance = sizes_within_budget(power, sigmas, candidates, budget)
        assert token_ratio(sizes, (32, 32)) <= budget
        assert sizes == sizes_for(power, sigmas, candidates, tolerance)
        smaller = [s for s in {lost_share(power, sig, c) for sig in sigmas[:-1] for c in candidates} | {0.0} if s < tolerance]
        assert all(token_ratio(sizes_for(power, sigmas, candidates, s), (32, 32)) > budget for s in smaller)
    with pytest.raises(ValueError, match=r"out of reach.*at least 0\.2969.*more steps"):
        sizes_within_budget(power, sigmas, candidates, 0.2)  # 3 x 8x8 + 32x32 = 0.2969 of 4 x 32x32


def test_grid_indices_run_from_pure_noise_to_the_last_sigma():
    assert grid_indices(4, 18) == [0, 6, 12, 18]
    assert grid_indices(6, 18) == [0, 4, 7, 11, 14, 18]
    assert grid_indices(1, 18) == [0]
    with pytest.raises(ValueError, match="at least 1"):
        grid_indices(0, 18)
    with pytest.raises(ValueError, match="distinct grid points"):
        grid_indices(5, 3)


# ----------------------------------------------------------------------------- the command


def write_folder(root, n: int, size: tuple[int, int], mode: str, corrupt: bool = False):
    """``n`` smooth random images (1/f^2 noise) with a metainfo.csv."""
    (root / "images").mkdir(parents=True)
    for i in range(n):
        x = images_with_spectrum(inverse_square(*size, a=0.05), 3 if mode == "RGB" else 1, seed=i)[:, 0]  # (C, h, w)
        x = ((x - x.min()) / (x.max() - x.min()) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        Image.fromarray(x if mode == "RGB" else x[..., 0], mode).save(root / "images" / image_name(i))
    if corrupt:
        (root / "images" / image_name(0)).write_bytes(b"not a png")
    write_metainfo(root, range(n), ["a red car"])  # the layout swd make-data writes
    return root


@pytest.fixture(scope="module")
def grey_folder(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("grey"), 8, (32, 32), "L")


@pytest.fixture(scope="module")
def rgb_folder(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("rgb"), 6, (32, 32), "RGB")


def run(folder, out, *overrides, check: bool = True):
    return swd_in_process("schedule", "data.kind=folder", f"data.root={folder}", f"output_dir={out}", "device=cpu", *overrides, check=check)


def test_schedule_end_to_end_on_a_tiny_folder(grey_folder, tmp_path):
    out = tmp_path / "run"
    proc = run(grey_folder, out, "spectral.tolerance=0.1", "spectral.sigma_source=grid")
    assert "token ratio" in proc.stdout and "| step | sigma | size |" in proc.stdout and "sigmas from grid" in proc.stdout
    for name in ("schedule.yaml", "schedule.json", "schedule.png"):
        assert (out / name).is_file() and f"wrote {out / name}" in proc.stdout
    assert load_config(out / "config.yaml").spectral.tolerance == 0.1  # the resolved config, as every command saves
    # the snippet is a config swd distill accepts
    schedule = ScaleSchedule.from_config(load_config(out / "schedule.yaml").schedule)
    record = json.loads((out / "schedule.json").read_text())
    assert schedule.final_size == (32, 32) and schedule.num_steps == 4
    assert [list(s) for s in schedule.sizes] == [s["size"] for s in record["steps"]]
    assert list(schedule.sigmas) == pytest.approx([1.0, 0.9133, 0.7904, 0.6022, 0.0], abs=1e-4)  # grid indices 0, 6, 12, 18
    assert [s["grid_index"] for s in record["steps"]] == [0, 6, 12, 18]
    assert all(h % 2 == 0 and w % 2 == 0 and h >= 16 for h, w in schedule.sizes)  # patch 2, min_ratio 0.5
    load_model_space("teacher").check_schedule(schedule)  # every size fits the shipped teacher
    assert all(s["lost_share"] <= 0.1 for s in record["steps"])
    assert record["token_ratio"] == pytest.approx(token_ratio(schedule.sizes, (32, 32)), abs=1e-6)
    assert record["data"] == {"source": f"folder {grey_folder}", "images": 8, "space": "pixels"}
    assert (record["patch_size"], record["vae_factor"], record["max_side"]) == (2, 1, 32)
    assert record["reference"]["sizes"] == [[16, 16], [20, 20], [24, 24], [32, 32]]  # the config's own schedule
    # the spectrum is that of the folder's images, read as the model reads them
    folder = ImageCaptionFolder(grey_folder, 32, channels=1)
    expected_f, expected_p = radial_profile(power_spectrum(torch.stack([folder.load_image(i) for i in range(8)])))
    assert record["spectrum"]["frequency"] == pytest.approx(expected_f.tolist(), abs=1e-6)
    assert record["spectrum"]["power"] == pytest.approx(expected_p.tolist(), rel=1e-5)
    with Image.open(out / "schedule.png") as image:
        assert image.size[0] > 600 and image.size[1] > 400


def test_non_square_final_size_and_a_token_budget(grey_folder, tmp_path):
    out = tmp_path / "run"
    run(grey_folder, out, "spectral.final_size=[24,32]", "spectral.token_ratio=0.6", "spectral.num_images=5", "spectral.min_ratio=0.25")
    record = json.loads((out / "schedule.json").read_text())
    snippet = yaml.safe_load((out / "schedule.yaml").read_text())
    schedule = ScaleSchedule.from_config(load_config(out / "schedule.yaml").schedule)
    assert schedule.final_size == (24, 32) and snippet["schedule"]["sizes"][-1] == [24, 32]
    assert record["token_ratio"] <= 0.6 and record["data"]["images"] == 5
    assert record["rule"]["tolerance_used"] == pytest.approx(max(s["lost_share"] for s in record["steps"]), abs=1e-6)
    assert record["reference"] is None  # the config's schedule ends at 32x32, not 24x32


@pytest.mark.parametrize("overrides,sigmas,source", [
    ([], [1.0, 0.8959, 0.7371, 0.6022, 0.0], "schedule.sigmas"),  # the default: the config's sigmas, only sizes derived
    (["schedule.sigmas=[1.0,0.7,0.0]", "schedule.sizes=[16,32]"], [1.0, 0.7, 0.0], "schedule.sigmas"),
    (["spectral.steps=6"], None, "grid"),  # the config's schedule has 4 steps, not 6
    (["spectral.sigma_source=grid"], [1.0, 0.9133, 0.7904, 0.6022, 0.0], "grid"),
])
def test_sigmas_come_from_the_config_schedule_unless_it_has_other_steps(grey_folder, tmp_path, overrides, sigmas, source):
    out = tmp_path / "run"
    run(grey_folder, out, *overrides)
    record = json.loads((out / "schedule.json").read_text())
    assert record["rule"]["sigmas_from"] == source
    if sigmas is not None:
        assert record["schedule"]["sigmas"] == pytest.approx(sigmas, abs=1e-4)
    assert len(record["steps"]) == (6 if "spectral.steps=6" in overrides else len(sigmas) - 1)
    assert all(s["grid_index"] is None for s in record["steps"]) == (source != "grid")


def test_given_sigmas_keep_their_values(grey_folder, tmp_path):
    out = tmp_path / "run"
    run(grey_folder, out, "spectral.sigmas=[1.0,0.8959,0.7371,0.6022,0.0]", "spectral.noise_floor=final")
    record = json.loads((out / "schedule.json").read_text())
    assert record["schedule"]["sigmas"] == [1.0, 0.8959, 0.7371, 0.6022, 0.0]
    assert [s["grid_index"] for s in record["steps"]] == [None] * 4 and record["rule"]["noise_floor"] == "final"


@pytest.mark.parametrize("overrides,message", [
    (["spectral.steps=0"], "spectral.steps must be at least 1"),
    (["spectral.token_ratio=0.1"], "out of reach"),
    (["spectral.token_ratio=1.5"], "spectral.token_ratio is a share"),
    (["spectral.tolerance=1"], "spectral.tolerance is a share"),
    (["spectral.noise_floor=pixel"], "spectral.noise_floor must be one of step, final"),
    (["spectral.sigma_source=paper"], "spectral.sigma_source must be one of schedule, grid"),
    (["spectral.steps=3", "spectral.sigmas=[1.0,0.5,0.0]"], "drop one of them"),
    (["spectral.sigmas=[1.0,0.5]"], "spectral.sigmas: the last sigma must be 0"),
    (["spectral.final_size=64"], "exceeds what the position embedding supports"),
    (["spectral.final_size=31"], "not divisible by the patch size 2"),
    (["spectral.steps=30"], "distinct grid points"),  # not the config's 4 steps: the grid
    (["spectral.num_images=0"], "spectral.num_images must be at least 1"),
])
def test_bad_input_is_refused_with_the_fix(grey_folder, tmp_path, overrides, message):
    proc = run(grey_folder, tmp_path / "run", *overrides, check=False)
    assert proc.returncode == 1 and message in proc.stderr, proc.stderr


def test_missing_or_unreadable_data_is_named(tmp_path):
    missing = swd_in_process("schedule", "data.kind=folder", f"data.root={tmp_path / 'nowhere'}", f"output_dir={tmp_path}", check=False)
    assert missing.returncode == 1 and "does not exist" in missing.stderr
    no_root = swd_in_process("schedule", "data.kind=folder", f"output_dir={tmp_path}", check=False)
    assert no_root.returncode == 1 and "data.kind=folder needs data.root" in no_root.stderr
    broken = write_folder(tmp_path / "broken", 3, (32, 32), "L", corrupt=True)
    proc = swd_in_process("schedule", "data.kind=folder", f"data.root={broken}", f"output_dir={tmp_path / 'o'}", "device=cpu", check=False)
    assert proc.returncode == 1 and "cannot read image" in proc.stderr and image_name(0) in proc.stderr


def test_help_lists_the_command():
    from swd.cli import build_parser

    assert "schedule" in build_parser().format_help()


# ----------------------------------------------------------------------------- pipeline latents


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines")
    return {"sd3": tiny_sd3_pipeline(root / "sd3"), "flux": tiny_flux_pipeline(root / "flux")}


@pytest.mark.parametrize("name,final", [("sd3", [16, 16]), ("flux", [12, 16])])
def test_schedule_on_the_latents_of_tiny_pipelines(pipelines, rgb_folder, tmp_path, name, final):
    out = tmp_path / name
    run(rgb_folder, out, f"model.pretrained={pipelines[name]}", f"spectral.final_size={final}", "spectral.min_ratio=0.25")
    record = json.loads((out / "schedule.json").read_text())
    assert record["data"]["space"] == "latents" and record["final_size"] == final
    assert (record["vae_factor"], record["patch_size"]) == (2, 2)  # FLUX: 2x2 packing of patch 1
    schedule = ScaleSchedule.from_config(load_config(out / "schedule.yaml").schedule)
    assert list(schedule.final_size) == final
    assert all(h % 2 == 0 and w % 2 == 0 for h, w in schedule.sizes)
    # the same latents the trainer would make: the whole pipeline's Denoiser.to_model_space (VAE mean,
    # scaling and shift factors), not the light loader the command uses
    teacher, _ = load_reference(str(pipelines[name]), ModelConfig(max_text_length=16))
    folder = ImageCaptionFolder(rgb_folder, (final[0] * 2, final[1] * 2), channels=3)
    latents = teacher.to_model_space(torch.stack([folder.load_image(i) for i in range(len(folder))]), tuple(final))  # (6, 4, h, w)
    expected_f, expected_p = radial_profile(power_spectrum(latents))
    assert record["spectrum"]["power"] == pytest.approx(expected_p.tolist(), rel=1e-4)
    light = load_model_space(str(pipelines[name]))
    assert (light.patch_size, light.max_side, light.codec.factor) == (teacher.patch_size, teacher.max_side, teacher.codec.factor)
    assert (light.codec.scale, light.codec.shift) == (teacher.codec.scale, teacher.codec.shift)

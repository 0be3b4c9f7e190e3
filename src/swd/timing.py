"""Side-by-side timing: several workloads measured interleaved in one process, median of repeats.

These machines are noisy; timing candidates one after another in separate runs mixes machine
noise into the comparison. Interleaving (A, B, C, A, B, C, ...) and taking medians does not.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
from tqdm.auto import tqdm


def synchronize(device: torch.device | str | None) -> None:
    """Wait for queued GPU work so wall-clock timing measures it (no-op on CPU)."""
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(workloads: dict[str, Callable[[], object]], repeats: int = 3, warmup: int = 1, device=None, progress: bool = True) -> dict[str, list[float]]:
    """Seconds of each call of each workload, in rounds that run every workload once.

    ``warmup`` untimed rounds run first. Returns name -> list of ``repeats`` durations.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        for fn in workloads.values():
            fn()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in workloads}
    for _ in tqdm(range(repeats), desc="timing rounds", disable=not progress):
        for name, fn in workloads.items():
            synchronize(device)
            t0 = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - t0)
    return times


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def per_image_timing(seconds_per_round: list[float], images_per_round: int) -> dict:
    """The record of one workload's rounds: the median seconds per image and the raw rounds."""
    if images_per_round < 1:
        raise ValueError(f"images_per_round must be >= 1, got {images_per_round}")
    return {"sample_seconds_per_image": round(median(seconds_per_round) / images_per_round, 5),
            "sample_timing": {"images_per_round": images_per_round, "rounds": len(seconds_per_round),
                              "seconds_per_round": [round(t, 3) for t in seconds_per_round]}}

"""Run checkpoints (accelerate's save_state, written atomically), resuming, and the finite-loss
check that stops a run before a NaN reaches the weights."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from ..config import Config, config_to_dict

CHECKPOINT_DIR = "checkpoints"
LATEST_FILE = "latest"
STATE_FILE = "swd_state.json"


def check_finite(losses: dict[str, torch.Tensor], step: int, stage: int | None = None) -> None:
    """Stop with a message naming the loss, the step and the stage if any loss is NaN or Inf."""
    for name, value in losses.items():
        if not torch.isfinite(value).all():
            where = f"step {step}" + (f", stage {stage}" if stage is not None else "")
            raise FloatingPointError(
                f"loss {name!r} is {value.item() if value.numel() == 1 else 'non-finite'} at {where}; "
                "the last complete checkpoint is kept. Lower the learning rate or check the data."
            )


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


def _flatten(section: dict, prefix: str = "") -> dict:
    """``{"optim": {"lr": 1}}`` -> ``{"optim.lr": 1}``."""
    out = {}
    for key, value in section.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def check_resume_config(saved: dict, current: Config, sections: tuple[str, ...]) -> None:
    """A checkpoint from another model/schedule is an error that names the differing keys. A key
    the checkpoint's config predates (a setting added since) counts as its default."""
    now, defaults = config_to_dict(current), config_to_dict(Config())
    diffs = []
    for section in sections:
        a = {**_flatten(defaults.get(section, {})), **_flatten(saved.get(section, {}))}
        b = _flatten(now.get(section, {}))
        for key in sorted(set(a) | set(b)):
            if key.rsplit(".", 1)[-1] not in RESUMABLE_CHANGES and a.get(key) != b.get(key):
                diffs.append(f"{section}.{key}: checkpoint {a.get(key)!r} vs now {b.get(key)!r}")
    if diffs:
        raise ValueError("cannot resume: the checkpoint was made with another config (" + "; ".join(diffs) + "). Use another output_dir or the same config.")

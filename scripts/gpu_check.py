"""GPU check of the pipeline-teacher path and of ``swd bench`` (run on a CUDA machine).

Builds the tiny offline SD3 and FLUX pipelines of the test suite, distills each for a few steps on
the GPU in bf16 (a bf16 teacher loaded with ``model.torch_dtype=bfloat16``, autocast bf16, gradient
checkpointing), samples the student LoRA, then runs ``swd bench`` on the built-in teacher. Writes
``OUT/gpu_check.json`` (and ``OUT/bench/bench.json``).

    python scripts/gpu_check.py OUT
"""

from __future__ import annotations

import csv
import json
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from swd.config import load_config  # noqa: E402
from swd.distill.trainer import distill  # noqa: E402
from swd.generate import Sampler  # noqa: E402
from swd.registry import load_model, resolve_device  # noqa: E402
from swd.schedule import ScaleSchedule  # noqa: E402
from tiny_pipelines import tiny_flux_pipeline, tiny_sd3_pipeline  # noqa: E402


def caption_folder(root: Path, n: int = 16, side: int = 32) -> Path:
    (root / "images").mkdir(parents=True, exist_ok=True)
    with (root / "metainfo.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["index", "file_name", "caption"])
        for i in range(n):
            array = (np.random.RandomState(i).rand(side, side, 3) * 255).astype("uint8")
            Image.fromarray(array).save(root / "images" / f"{i}.png")
            writer.writerow([i, f"images/{i}.png", ["a red car", "a blue house", "a green tree", "a dog"][i % 4]])
    return root


def run_variant(name: str, pipeline: Path, data: Path, out: Path, extra: list[str]) -> dict:
    overrides = [f"model.pretrained={pipeline}", "model.max_text_length=16", "data.kind=folder", f"data.root={data}",
                 "schedule.sizes=[8,12,16]", "schedule.sigmas=[1.0,0.8,0.6,0.0]", "distill.steps=12", "distill.batch_size=8",
                 "distill.lora.rank=8", "distill.critic.updates=2", "distill.sample_every=0", "distill.checkpoint_every=6",
                 "distill.gradient_checkpointing=true", f"output_dir={out}", *extra]
    record = {"name": name, "overrides": extra}
    try:
        t = time.perf_counter()
        lora = distill(load_config(None, overrides))
        record["distill_seconds"] = time.perf_counter() - t
        record["train_summary"] = json.loads((out / "train_summary.json").read_text())
        config = load_config(None, [f"checkpoint={lora}", *[o for o in extra if o.startswith("model.")]])
        model = load_model(str(lora), config.model, resolve_device(config.device))
        sampler = Sampler("scalewise", ScaleSchedule([8, 12, 16], [1.0, 0.8, 0.6, 0.0]), 1.0)
        images = sampler(model, ["a red car"] * 4, torch.Generator().manual_seed(0))
        record.update(device=str(images.device), sample_shape=list(images.shape), sample_finite=bool(torch.isfinite(images).all()),
                      transformer_dtype=str(model.transformer.dtype), ok=True)
    except Exception as err:  # a check script: record the failure and go on to the next variant
        record.update(ok=False, error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc()[-3000:])
    print(json.dumps({k: v for k, v in record.items() if k != "traceback"}), flush=True)
    return record


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "gpu_check")
    out.mkdir(parents=True, exist_ok=True)
    work = Path("/tmp/swd_gpu_check")
    data = caption_folder(work / "data")
    pipes = {"sd3": tiny_sd3_pipeline(work / "sd3"), "flux": tiny_flux_pipeline(work / "flux")}
    result = {"torch": torch.__version__, "cuda": torch.cuda.is_available(),
              "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "runs": []}
    for family, path in pipes.items():
        for tag, extra in (("bf16-teacher+autocast", ["model.torch_dtype=bfloat16", "distill.mixed_precision=bf16"]),
                           ("fp32-teacher+autocast", ["distill.mixed_precision=bf16"])):
            result["runs"].append(run_variant(f"{family}/{tag}", path, data, work / f"{family}-{tag}", extra))
    (out / "gpu_check.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

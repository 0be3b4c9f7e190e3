"""Are two `swd distill` outputs the same student? Every tensor of ``student/`` (merged transformer,
conditioner) and ``student_lora/`` compared bitwise.

Used for the layout redesign's behaviour check: the same command on the tree before and after,

    git worktree add /tmp/before 8338aed
    (cd /tmp/before && PYTHONPATH=src python -m swd distill -c configs/distill_swd4.yaml distill.steps=20 output_dir=/tmp/ref_before)
    python -m swd distill -c configs/distill_swd4.yaml distill.steps=20 output_dir=/tmp/ref_after
    python scripts/compare_students.py /tmp/ref_before /tmp/ref_after --out results/layout_bitwise.json

(the "before" tree reads the flat distill config of its time, so configs/distill_swd4.yaml there
is the file as it was).
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

FILES = ["student/transformer/diffusion_pytorch_model.safetensors", "student/conditioner.safetensors",
         "student_lora/pytorch_lora_weights.safetensors"]


def compare(a: Path, b: Path) -> dict:
    report = {}
    for name in FILES:
        ta, tb = load_file(str(a / name)), load_file(str(b / name))
        differing = sorted(k for k in ta.keys() & tb.keys() if not torch.equal(ta[k], tb[k]))
        report[name] = {
            "tensors": len(ta),
            "same_keys": ta.keys() == tb.keys(),
            "bitwise_equal_tensors": sum(torch.equal(ta[k], tb[k]) for k in ta.keys() & tb.keys()),
            "differing": differing[:10],
            "parameters": sum(v.numel() for v in ta.values()),
            "sha256_of_tensors": hashlib.sha256(b"".join(ta[k].contiguous().numpy().tobytes() for k in sorted(ta))).hexdigest(),
        }
    report["identical"] = all(r["same_keys"] and not r["differing"] for r in report.values())
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    report = compare(args.before, args.after)
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    raise SystemExit(0 if report["identical"] else 1)


if __name__ == "__main__":
    main()

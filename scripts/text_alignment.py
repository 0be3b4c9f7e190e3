"""Prompt alignment only (Twemoji subcategory accuracy, caption retrieval) of text checkpoints.

The quick half of ``swd eval``: the same prompts (the checkpoint's own prompts.txt), the same seed
and the same shipped scorer, so its numbers equal ``swd eval``'s to the digit, but no Inception
features (no FID / precision / recall). A student takes about 1.5 minutes for 2,000 images on
2 cores instead of about 10, which is what a study of many settings can afford. Rows are appended
to --out as JSON lines (one per checkpoint, with the command that made it).

    python scripts/text_alignment.py --out runs/study/alignment.jsonl CHECKPOINT [CHECKPOINT ...] \
        [--num-samples 2000] [--mode scalewise] [--guidance G] [--guidance-interval LO HI] [--name NAME ...] [--set KEY=VALUE ...]

``--set`` takes config overrides, e.g. ``--mode scalewise --set 'schedule.sizes=[32,32,32,32]'`` to score
the undistilled teacher on another 4-step schedule.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from swd.commands import configured_scorers, generate_many, resolve_sampler, sampler_record
from swd.config import load_config
from swd.generate import condition_values_for
from swd.registry import default_prompts, load_model, model_name, resolve_device


def alignment(checkpoint: str, num_samples: int, mode: str | None = None, batch_size: int = 100,
              overrides: tuple[str, ...] = (), guidance: float | None = None, guidance_interval=None) -> dict:
    """Subcategory accuracy and retrieval top-1 / top-5 of ``num_samples`` images of ``checkpoint``
    (``overrides``: config ``key=value`` strings, e.g. the schedule mode "scalewise" runs; ``guidance``:
    classifier-free guidance of the sampler, None for the checkpoint's own, as ``swd eval eval.guidance``;
    ``guidance_interval``: [lo, hi] noise levels it is limited to, as ``eval.guidance_interval``)."""
    config = load_config(None, [f"checkpoint={checkpoint}", "eval.twemoji_scorer=shipped", f"eval.num_samples={num_samples}",
                                f"eval.batch_size={batch_size}", *overrides])
    name = model_name(config)
    model = load_model(name, config.model, resolve_device(config.device))
    if model.num_classes is not None:
        raise ValueError(f"{checkpoint} is class-conditional; this script scores Twemoji text models")
    prompts = default_prompts(name)
    if not prompts:
        raise ValueError(f"{checkpoint} ships no prompts.txt; score it with swd eval eval.prompts=FILE")
    sampler = resolve_sampler(config, name, mode, guidance, guidance_interval)
    values = condition_values_for(model, num_samples, prompts=prompts)
    images, seconds = generate_many(model, sampler, values, config.eval.seed, batch_size)
    record = {"checkpoint": checkpoint, **sampler_record(sampler), "num_samples": num_samples}
    for scorer in configured_scorers(config.eval):
        record.update(scorer(images, values))
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--out", type=Path, required=True, help="JSON lines file the rows are appended to")
    parser.add_argument("--num-samples", type=int, default=2000)
    parser.add_argument("--mode", default=None, help="sampling mode (default: the checkpoint's own)")
    parser.add_argument("--name", nargs="*", default=None, help="a name per checkpoint (default: the checkpoint)")
    parser.add_argument("--guidance", type=float, default=None,
                        help="classifier-free guidance (default: the checkpoint's own; a student's is 1.0)")
    parser.add_argument("--guidance-interval", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                        help="guide only the steps whose noise level lies in [LO, HI] (default: every step)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides for every checkpoint")
    args = parser.parse_args()
    names = args.name or args.checkpoints
    if len(names) != len(args.checkpoints):
        parser.error(f"--name got {len(names)} names for {len(args.checkpoints)} checkpoints")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    for name, checkpoint in zip(names, args.checkpoints):
        record = {"name": name, **alignment(checkpoint, args.num_samples, args.mode, overrides=tuple(args.set), guidance=args.guidance,
                                                guidance_interval=args.guidance_interval), "command": command}
        print(json.dumps(record))
        with args.out.open("a") as handle:
            handle.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()

"""Assemble a reproduction table after its script trained and evaluated every baseline.

``--table fashion-mnist`` (results/reproduction.json, after scripts/reproduce.sh): quality (FID on
2,000 samples vs the 10k Fashion-MNIST test set, class accuracy) comes from each row's `swd eval`
record; the teacher rows come from results/teacher.json (the same protocol).
``--table text`` (results/reproduction_text.json, after scripts/reproduce_text.sh): every row,
teacher included, has its own `swd eval` record under runs/text_repro (FID vs the whole Twemoji
set, precision / recall, subcategory accuracy and caption retrieval top-1).
Sampling seconds per image for ALL rows are measured here, side by side in this one process
(interleaved rounds, median). Training seconds per iteration and minutes come from each run's
train_summary.json. A side-by-side picture of the first 100 samples of every row is written too.

    python scripts/reproduction.py [--table fashion-mnist|text] [--timing-images 250] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from swd.commands import sampling_workload
from swd.viz import side_by_side
from swd.timing import per_image_timing, time_interleaved

# name, checkpoint, sampling mode (None: the checkpoint's own), run directory (None: the teacher)
ROWS = [
    ("teacher", "teacher", "teacher", None),
    ("undistilled-sw-4", "teacher", "scalewise", None),
    ("swd-4", "runs/swd-4/student", None, "runs/swd-4"),
    ("fullres-4", "runs/fullres-4/student", None, "runs/fullres-4"),
    ("fullres-2", "runs/fullres-2/student", None, "runs/fullres-2"),
    ("swd-mmd-4", "runs/swd-mmd-4/student", None, "runs/swd-mmd-4"),
]
TEACHER_ROWS = {"teacher": "teacher-28", "undistilled-sw-4": "scalewise-4-undistilled"}
COMMANDS = {
    "teacher": "bash scripts/teacher_report.sh 2000",
    "undistilled-sw-4": "bash scripts/teacher_report.sh 2000",
    "swd-4": "swd distill -c {swd4} output_dir=runs/swd-4 && swd eval checkpoint=runs/swd-4/student --name swd-4",
    "fullres-4": "swd distill -c configs/distill_fullres4.yaml && swd eval checkpoint=runs/fullres-4/student --name fullres-4",
    "fullres-2": "swd distill -c configs/distill_fullres2.yaml && swd eval checkpoint=runs/fullres-2/student --name fullres-2",
    "swd-mmd-4": "swd distill -c configs/distill_swd_mmd4.yaml && swd eval checkpoint=runs/swd-mmd-4/student --name swd-mmd-4",
}
TEXT_EVAL = "eval.reference=data/twemoji/images eval.twemoji_scorer=shipped eval.num_samples=2000"
TEXT_ROWS = [
    ("teacher", "twemoji-teacher", "teacher", None),
    ("undistilled-sw-4", "twemoji-teacher", "scalewise", None),
    *[(name, f"runs/twemoji-{name}/student", None, f"runs/twemoji-{name}") for name in ("swd-4", "fullres-4", "fullres-2", "swd-mmd-4")],
]
TEXT_COMMANDS = {
    "teacher": f"swd eval checkpoint=twemoji-teacher eval.mode=teacher {TEXT_EVAL}",
    "undistilled-sw-4": f"swd eval checkpoint=twemoji-teacher eval.mode=scalewise {TEXT_EVAL}",
    **{name: f"swd distill -c configs/distill_twemoji_{cfg}.yaml && swd eval checkpoint=runs/twemoji-{name}/student {TEXT_EVAL}"
       for name, cfg in (("swd-4", "swd4"), ("fullres-4", "fullres4"), ("fullres-2", "fullres2"), ("swd-mmd-4", "swd_mmd4"))},
}
QUALITY_KEYS = ("fid", "class_accuracy", "precision", "recall", "num_samples")
TEXT_QUALITY_KEYS = ("fid", "precision", "recall", "subcategory_accuracy", "retrieval_top1", "retrieval_top5", "num_samples", "reference")


def text_quality(name: str) -> dict:
    path = Path("runs/text_repro") / name / "eval.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run scripts/reproduce_text.sh first")
    row = json.loads(path.read_text())
    return {k: row[k] for k in TEXT_QUALITY_KEYS}


def quality(name: str, run: str | None, teacher_results: list[dict]) -> dict:
    if run is None:
        row = next(r for r in teacher_results if r["name"] == TEACHER_ROWS[name])
    else:
        path = Path(run) / "eval" / "eval.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: run scripts/reproduce.sh first")
        row = json.loads(path.read_text())
    missing = [k for k in QUALITY_KEYS if k not in row]
    if missing:
        source = "results/teacher.json (rerun scripts/teacher_report.sh)" if run is None else f"{run}/eval/eval.json (rerun its swd eval)"
        raise KeyError(f"{source} has no {missing}: it predates them")
    return {k: row[k] for k in QUALITY_KEYS}


def training(run: str | None) -> dict:
    if run is None:
        return {"train_seconds_per_iteration": None, "train_minutes": None, "train_iterations": None}
    summary = json.loads((Path(run) / "train_summary.json").read_text())
    return {
        "train_seconds_per_iteration": round(summary["seconds_per_iteration"], 3),
        "train_minutes": round(summary["train_seconds"] / 60, 1),
        "train_iterations": summary["steps"],
    }


# which side-by-side benchmark iteration each row's training matches (same loss set and sizes)
BENCH_ROWS = {"swd-4": "scalewise-full", "fullres-4": "fullres-full", "fullres-2": "fullres-full", "swd-mmd-4": "scalewise-mmd"}


def add_bench(rows: list[dict], bench_path: Path) -> None:
    """Training seconds per iteration measured side by side on an idle machine (``swd bench``).

    The runs' own seconds per iteration are kept too: they ran two at a time, sharing the CPU with
    other work, so they carry machine noise the side-by-side numbers do not.
    """
    if not bench_path.is_file():
        return
    bench = json.loads(bench_path.read_text())
    for row in rows:
        if row["name"] in BENCH_ROWS:
            row["train_seconds_per_iteration_side_by_side"] = round(bench["train_seconds_per_iteration"][BENCH_ROWS[row["name"]]], 3)
            row["train_side_by_side_command"] = f"swd bench -c configs/distill_swd4.yaml bench.batch_size={bench['batch_size']} ({bench_path})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", choices=("fashion-mnist", "text"), default="fashion-mnist")
    parser.add_argument("--timing-images", type=int, default=None, help="images per timing round (250 class-conditional, 50 text)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="results/reproduction.json or results/reproduction_text.json")
    parser.add_argument("--picture", default=None, help="docs/reproduction.png or docs/reproduction_text.png")
    parser.add_argument("--picture-only", action="store_true", help="only (re)draw the picture; no timing, no JSON")
    parser.add_argument("--bench", default="results/bench_distill_b16.json", help="side-by-side training timings (swd bench) to add")
    parser.add_argument("--update-bench", action="store_true", help="only add --bench to the existing --out rows")
    parser.add_argument("--swd4-config", default="configs/distill_swd4.yaml",
                        help="the SwD row's config: its schedule is also the undistilled row's")
    args = parser.parse_args()
    text = args.table == "text"
    suffix = "_text" if text else ""
    args.out = args.out or f"results/reproduction{suffix}.json"
    args.picture = args.picture or f"docs/reproduction{suffix}.png"
    args.timing_images = args.timing_images or (50 if text else 250)
    rows_spec, commands = (TEXT_ROWS, TEXT_COMMANDS) if text else (ROWS, COMMANDS)
    if args.update_bench:
        rows = json.loads(Path(args.out).read_text())
        add_bench(rows, Path(args.bench))
        Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
        return
    teacher_results = [] if text else json.loads(Path("results/teacher.json").read_text())

    workloads, meta, pictures = {}, {}, {}
    picture_count, picture_nrow = (16, 4) if text else (100, 10)
    for name, checkpoint, mode, run in rows_spec:
        sampler, model, values, workloads[name] = sampling_workload(checkpoint, args.timing_images, mode, text=text,
                                                                    config_path=None if text else args.swd4_config)
        pictures[name] = sampler(model, values[:picture_count], torch.Generator().manual_seed(0)).cpu()
        meta[name] = {"steps": sampler.steps, "nfe": sampler.nfe, "guidance": sampler.guidance,
                      "sizes": [list(s) for s in sampler.schedule.sizes] if sampler.mode != "teacher" else None}

    labels = [f"{n} ({meta[n]['steps']} steps, {meta[n]['nfe']} NFE)" for n in pictures]
    side_by_side(list(pictures.values()), labels, Path(args.picture), nrow=picture_nrow, per_row=3)
    if text:  # the prompts of the picture, row by row, for the README
        prompts = values[:picture_count]  # every row draws the same prompts
        print("picture prompts, row by row:", [prompts[i:i + picture_nrow] for i in range(0, picture_count, picture_nrow)])
    if args.picture_only:
        return
    with torch.inference_mode():
        times = time_interleaved(workloads, repeats=args.repeats, warmup=0)
    rows = []
    for name, checkpoint, mode, run in rows_spec:
        rows.append({
            "name": name,
            **meta[name],
            **(text_quality(name) if text else quality(name, run, teacher_results)),
            **per_image_timing(times[name], args.timing_images),
            **training(run),
            "command": commands[name].format(swd4=args.swd4_config),
        })
    if not text:
        add_bench(rows, Path(args.bench))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

"""The schedule study, assembled after scripts/fidelity.py trained and measured its settings.

Writes two results files from fidelity.py's rows (every setting distilled from the same base config for
the same number of generator updates, each measured by ``swd eval`` with one protocol):

- ``results/ablations.json`` and ``docs/ablations.png``: the schedule questions of the method at small
  scale (growing against constant sizes, 2 / 4 / 6 steps, the first size, the upsampling between steps),
  on Fashion-MNIST;
- ``results/schedule.json``: the schedule ``swd schedule`` recommends against the hand-set 16-20-24-32,
  on Fashion-MNIST and on the Twemoji text set.

Sampling seconds per image are measured here, side by side for every student of a file (interleaved
rounds, median), not taken from the evals, which ran two at a time. Timing depends on the schedule and
the network, not on the weights, so a setting whose run went on past the measured budget is timed
with its latest student.

    python scripts/schedule_study.py --rows runs/fidelity/rows_a.json runs/fidelity/rows_sched_a.json \\
        runs/fidelity/rows_sched_b.json --text-rows runs/fidelity/rows_sched_twemoji.json
    python scripts/schedule_study.py --redraw          # only redraw docs/ablations.png from the two results files
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch

from swd.commands import sampling_workload
from swd.spectrum import token_ratio
from swd.timing import per_image_timing, time_interleaved

FINAL = (32, 32)
HAND_SET = "guidance-2"  # the hand-set 16-20-24-32 at DMD guidance 2: the base every ablation changes one thing of
# question, label, setting name (fidelity.py's --setting NAME)
ABLATIONS = [
    ("growing vs constant sizes (4 steps)", "growing 16-20-24-32", HAND_SET),
    ("growing vs constant sizes (4 steps)", "constant 32-32-32-32", "g2-constant-32"),
    ("number of steps", "2 steps 16-32", "g2-2-steps"),
    ("number of steps", "4 steps 16-20-24-32", HAND_SET),
    ("number of steps", "6 steps 16-18-20-24-28-32", "g2-6-steps"),
    ("first size", "first 16: 16-20-24-32", HAND_SET),
    ("first size", "first 8: 8-16-24-32", "g2-first-8"),
    ("upsampling between steps", "bicubic", HAND_SET),
    ("upsampling between steps", "nearest", "g2-nearest"),
    ("upsampling between steps", "bilinear", "g2-bilinear"),
]
# data set -> role -> setting name. "recommended": swd schedule's sizes at the config's sigmas (its default,
# spectral.sigma_source=schedule); "recommended_grid_sigmas": its sizes and sigmas with sigma_source=grid (grid
# points evenly spaced in index). Twemoji asks for the hand-set's token ratio as a budget (its default tolerance
# gives 16-16-28-32, 0.566 of the tokens, more than the hand-set's 0.551).
SCHEDULE_ROWS = {
    "fashion_mnist": {"hand_set": HAND_SET, "recommended": "g2-sizes-16-16-24-32",
                      "recommended_grid_sigmas": "g2-recommended-16-16-26-32"},
    "twemoji": {"hand_set": "twemoji-hand-set-16-20-24-32", "recommended": "twemoji-sizes-16-16-26-32",
                "recommended_grid_sigmas": "twemoji-recommended-16-16-26-32"},
}
TWEMOJI = "swd schedule checkpoint=twemoji-teacher data.kind=folder data.root=data/twemoji spectral.token_ratio=0.551"
RECOMMENDED_BY = {
    "fashion_mnist": {"recommended": "swd schedule output_dir=runs/schedule_fashion_mnist",
                      "recommended_grid_sigmas": "swd schedule output_dir=runs/schedule_fashion_mnist_grid spectral.sigma_source=grid"},
    "twemoji": {"recommended": f"{TWEMOJI} output_dir=runs/schedule_twemoji_paper_budget",
                "recommended_grid_sigmas": f"{TWEMOJI} output_dir=runs/schedule_twemoji_budget spectral.sigma_source=grid"},
}
QUALITY_KEYS = ("fid", "precision", "recall", "density", "coverage", "class_accuracy", "subcategory_accuracy",
                "retrieval_top1", "num_samples")


def load_rows(paths: list[Path], steps: int) -> dict[str, dict]:
    """Setting name -> its row at ``steps`` generator updates (first file first)."""
    rows: dict[str, dict] = {}
    for path in paths:
        for r in json.loads(path.read_text()):
            if r["steps"] == steps:
                rows.setdefault(r["name"], r)
    return rows


def student_of(name: str, runs: Path) -> Path:
    return runs / name / "student"


def time_students(students: dict[str, Path], images: int, repeats: int, text: bool) -> dict[str, dict]:
    """Each student's schedule, upsampling and sampling seconds per image, measured side by side."""
    workloads, meta = {}, {}
    for name, checkpoint in students.items():
        sampler, _, _, workloads[name] = sampling_workload(str(checkpoint), images, text=text)
        meta[name] = {"sizes": [list(s) for s in sampler.schedule.sizes], "sigmas": list(sampler.schedule.sigmas),
                      "upsample_mode": sampler.upsample_mode, "steps": sampler.steps,
                      "token_ratio": round(token_ratio(sampler.schedule.sizes, FINAL), 4)}
    with torch.inference_mode():
        times = time_interleaved(workloads, repeats=repeats, warmup=1)
    for name in meta:
        meta[name].update(per_image_timing(times[name], images))
    return meta


def quality(row: dict) -> dict:
    return {k: row[k] for k in QUALITY_KEYS if row.get(k) is not None}


def ablations(rows: dict[str, dict], meta: dict[str, dict], teacher: dict) -> list[dict]:
    out = []
    for question, label, name in ABLATIONS:
        r = rows[name]
        out.append({"question": question, "label": label, "setting": name, "overrides": r["overrides"], "steps": r["steps"],
                    **{k: v for k, v in meta[name].items() if k != "steps"}, "sampling_steps": meta[name]["steps"],
                    **quality(r), "fid_vs_teacher": round(r["fid"] / teacher["fid"], 3),
                    "recall_vs_teacher": round(r["recall"] / teacher["recall"], 3), "commands": r["commands"]})
    return out


def schedule_entry(row: dict, meta: dict, command: str | None) -> dict:
    entry = {**{k: meta[k] for k in ("sizes", "sigmas", "token_ratio", "sample_seconds_per_image", "sample_timing")},
             **quality(row), "training_updates": row["steps"], "commands": row["commands"]}
    if command:
        entry["recommended_by"] = command
    return entry


def compare(entries: dict[str, dict]) -> dict:
    """The target: FID at most 1.05x the hand-set's at no more tokens, or its FID with fewer tokens."""
    hand = entries["hand_set"]
    out = {}
    for role, e in entries.items():
        if role == "hand_set":
            continue
        fid_ratio = round(e["fid"] / hand["fid"], 3)
        out[role] = {"fid_vs_hand_set": fid_ratio, "token_ratio_vs_hand_set": round(e["token_ratio"] / hand["token_ratio"], 3),
                     "sample_seconds_vs_hand_set": round(e["sample_seconds_per_image"] / hand["sample_seconds_per_image"], 3),
                     "recall_vs_hand_set": round(e["recall"] / hand["recall"], 3) if hand["recall"] else None,
                     "meets_target": e["token_ratio"] <= hand["token_ratio"] and fid_ratio <= 1.05}
    return out


SCHEDULE_QUESTION = "the schedule command (results/schedule.json)"
SCHEDULE_LABELS = {"recommended": "swd schedule: {sizes}", "recommended_grid_sigmas": "swd schedule, grid sigmas: {sizes}"}


def schedule_figure_rows(schedule: dict) -> list[dict]:
    """The Fashion-MNIST ``swd schedule`` rows of results/schedule.json, in the ablation rows' shape (the
    figure draws them after the ablations, as the README's table does)."""
    out = []
    for role, label in SCHEDULE_LABELS.items():
        e = schedule["fashion_mnist"][role]
        sizes = "-".join(str(h) for h, _ in e["sizes"])
        out.append({"question": SCHEDULE_QUESTION, "label": label.format(sizes=sizes),
                    **{k: e[k] for k in ("token_ratio", "fid", "recall", "sample_seconds_per_image")}})
    return out


def picture(entries: list[tuple[str, Path]], path: Path, rows: int = 3) -> Path:
    """The first ``rows`` rows of every eval's sample grid (one column per class), one block per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    fig, axes = plt.subplots(len(entries), 1, figsize=(6.5, 2.05 * len(entries)))
    for ax, (label, grid) in zip(axes, entries):
        image = Image.open(grid).convert("L")
        cell = image.height / 10
        ax.imshow(image.crop((0, 0, image.width, round(rows * cell))), cmap="gray")
        ax.set_title(label, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def figure(rows: list[dict], teacher: dict, path: Path) -> Path:
    """FID, recall and sampling seconds per image of every ablation, grouped by question."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['label']}  ({r['token_ratio']:.2f} tokens)" for r in rows]
    colours = {q: f"C{i}" for i, q in enumerate(dict.fromkeys(r["question"] for r in rows))}
    fig, axes = plt.subplots(1, 3, figsize=(16, 0.42 * len(rows) + 1.6), sharey=True)
    for ax, key, title in zip(axes, ("fid", "recall", "sample_seconds_per_image"),
                              ("FID (lower is better)", "recall (higher is better)", "sampling s / image (side by side)")):
        ax.barh(range(len(rows)), [r[key] for r in rows], color=[colours[r["question"]] for r in rows])
        if key in teacher:
            ax.axvline(teacher[key], color="k", ls="--", label=f"teacher (28 steps) {teacher[key]:.3g}")
            ax.legend(fontsize=8, loc="lower right")
        ax.set_xlabel(title)
    axes[0].set_yticks(range(len(rows)), labels, fontsize=8)
    axes[0].invert_yaxis()
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colours.values()]
    fig.legend(handles, list(colours), loc="upper center", ncol=len(colours), fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=Path, nargs="+", help="fidelity.py row files (Fashion-MNIST); required unless --redraw")
    parser.add_argument("--text-rows", type=Path, nargs="*", default=[], help="fidelity.py row files (Twemoji)")
    parser.add_argument("--steps", type=int, default=300, help="the Fashion-MNIST settings' generator updates")
    parser.add_argument("--text-steps", type=int, default=200, help="the Twemoji settings' generator updates")
    parser.add_argument("--teacher", type=Path, default=Path("results/fidelity.json"), help="the teacher's row (same protocol)")
    parser.add_argument("--runs", type=Path, default=Path("runs/fidelity"))
    parser.add_argument("--timing-images", type=int, default=250)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--ablations-out", type=Path, default=Path("results/ablations.json"))
    parser.add_argument("--schedule-out", type=Path, default=Path("results/schedule.json"))
    parser.add_argument("--figure", type=Path, default=Path("docs/ablations.png"))
    parser.add_argument("--samples-figure", type=Path, default=Path("docs/ablations_samples.png"))
    parser.add_argument("--redraw", action="store_true",
                        help="only redraw --figure from the results files (--ablations-out, --schedule-out); no students needed")
    args = parser.parse_args()
    if args.redraw:
        ablation_result = json.loads(args.ablations_out.read_text())
        rows = ablation_result["rows"] + schedule_figure_rows(json.loads(args.schedule_out.read_text()))
        print(figure(rows, ablation_result["teacher"], args.figure))
        return
    if not args.rows:
        parser.error("--rows is required (the fidelity.py row files to tabulate), unless --redraw only redraws the figure")
    command = "python " + shlex.join(sys.argv)
    rows = load_rows(args.rows, args.steps)
    teacher = json.loads(args.teacher.read_text())["teacher"]
    names = list(dict.fromkeys([n for _, _, n in ABLATIONS] + [n for n in SCHEDULE_ROWS["fashion_mnist"].values()]))
    missing = [n for n in names if n not in rows]
    if missing:
        raise SystemExit(f"no row at {args.steps} updates for {missing} in {[str(p) for p in args.rows]}: run scripts/fidelity.py first")
    meta = time_students({n: student_of(n, args.runs) for n in names}, args.timing_images, args.repeats, text=False)

    table = ablations(rows, meta, teacher)
    args.ablations_out.write_text(json.dumps({"command": command, "teacher": teacher, "rows": table}, indent=1) + "\n")
    grids = [(f"{r['label']}: FID {r['fid']:.1f}, recall {r['recall']:.3f}",
              args.runs / r["setting"] / f"eval_{args.steps}" / f"{r['setting']}-{args.steps}_grid.png")
             for r in table if r["setting"] != HAND_SET or r["question"] == ABLATIONS[0][0]]
    print(picture(grids, args.samples_figure))

    result = {"command": command, "target": "recommended FID <= 1.05x the hand-set's at no more tokens"}
    fm = {role: schedule_entry(rows[n], meta[n], RECOMMENDED_BY["fashion_mnist"].get(role))
          for role, n in SCHEDULE_ROWS["fashion_mnist"].items()}
    result["fashion_mnist"] = {**fm, "comparison": compare(fm)}
    if args.text_rows:
        text_rows = load_rows(args.text_rows, args.text_steps)
        students = {n: student_of(n, args.runs) for n in SCHEDULE_ROWS["twemoji"].values()}
        text_meta = time_students(students, max(1, args.timing_images // 5), args.repeats, text=True)
        tw = {role: schedule_entry(text_rows[n], text_meta[n], RECOMMENDED_BY["twemoji"].get(role))
              for role, n in SCHEDULE_ROWS["twemoji"].items()}
        result["twemoji"] = {**tw, "comparison": compare(tw)}
    args.schedule_out.write_text(json.dumps(result, indent=1) + "\n")
    print(figure(table + schedule_figure_rows(result), teacher, args.figure))
    print(json.dumps({k: v["comparison"] for k, v in result.items() if isinstance(v, dict) and "comparison" in v}, indent=1))


if __name__ == "__main__":
    main()

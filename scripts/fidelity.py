"""The student-quality study: distill one setting at a time from a base config, measure each.

Every setting is the base config plus ``key=value`` overrides, trained for the same number of
generator updates (a step budget, not wall time), then measured by ``swd eval`` (FID, precision /
recall / density / coverage, class accuracy, seconds per image). A setting with several budgets
(``--steps 100 200 300``) is trained once, resumed from its own checkpoint to each budget and
measured at each: that is its learning curve. Rows go to --out (a JSON list, one row per setting
and budget, each with its commands); rows already there are skipped, so an interrupted study
resumes where it stopped.

    python scripts/fidelity.py --out results/fidelity.json --steps 300 --num-samples 1000 \
        --setting base --setting guidance-2 distill.loss.dmd_guidance=2.0 ...

``--setting NAME [KEY=VALUE ...]`` may repeat; the base config is --config
(default configs/distill_swd4_g3.yaml, the pre-study default of configs/distill_swd4.yaml).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

EVAL_KEYS = ("fid", "precision", "recall", "density", "coverage", "class_accuracy", "subcategory_accuracy", "retrieval_top1",
             "retrieval_top5", "seconds_per_image", "num_samples")


def run(cmd: list[str], log: Path) -> None:
    """Run ``cmd``, its output appended to ``log``; a failure stops the study, naming the log."""
    with log.open("a") as f:
        f.write(f"$ {shlex.join(cmd)}\n")
        f.flush()
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT)
    if rc:
        raise SystemExit(f"{shlex.join(cmd)} failed (exit {rc}); see {log}")


def train_summary(run_dir: Path) -> dict:
    path = run_dir / "train_summary.json"
    return json.loads(path.read_text()) if path.exists() else {}


def trained_steps(run_dir: Path) -> int | None:
    """The generator updates of ``run_dir``'s latest complete checkpoint (None before the first)."""
    from swd.train.checkpoints import latest_checkpoint, read_state

    latest = latest_checkpoint(run_dir)
    return read_state(latest)["step"] if latest is not None else None


def exported_steps(run_dir: Path) -> int | None:
    """The generator updates of the student ``run_dir`` exported last (None before the first)."""
    record = run_dir / "student" / "student.json"
    return json.loads(record.read_text()).get("step") if record.is_file() else None


def finished_eval(eval_dir: Path, num_samples: int) -> dict | None:
    """``eval_dir``'s eval.json when it measured ``num_samples`` samples (None otherwise)."""
    path = eval_dir / "eval.json"
    record = json.loads(path.read_text()) if path.is_file() else None
    return record if record is not None and record.get("num_samples") == num_samples else None


def measure_setting(name: str, overrides: list[str], steps: int, args: argparse.Namespace) -> dict:
    """Distill ``name`` to ``steps`` updates (resuming its own run) and evaluate the student."""
    run_dir = args.runs / name
    run_dir.mkdir(parents=True, exist_ok=True)
    trained = trained_steps(run_dir)
    if trained is not None and trained > steps:
        raise SystemExit(f"{run_dir} is already past {steps} updates; measure a smaller budget under another setting name")
    log = args.runs / f"{name}.log"
    distill = [args.swd, "distill", "-c", args.config, f"distill.steps={steps}", "distill.max_minutes=null",
               f"distill.sample_every={10 ** 6}", "distill.checkpoint_every=100", f"output_dir={run_dir}", *overrides]
    t0 = time.time()
    if trained != steps or exported_steps(run_dir) != steps:  # a study stopped after this budget's training skips it
        run(distill, log)
    eval_dir = run_dir / f"eval_{steps}"
    reference = args.eval_override or [f"eval.reference_images={args.reference_images}"]
    evaluate = [args.swd, "eval", f"checkpoint={run_dir / 'student'}", f"eval.num_samples={args.num_samples}", *reference,
                f"output_dir={eval_dir}", "--name", f"{name}-{steps}"]
    if finished_eval(eval_dir, args.num_samples) is None:  # ... and its eval, when that finished too
        run(evaluate, log)
    record = finished_eval(eval_dir, args.num_samples)
    if record is None:
        raise SystemExit(f"{shlex.join(evaluate)} wrote no eval.json of {args.num_samples} samples; see {log}")
    summary = train_summary(run_dir)
    row = {"name": name, "overrides": overrides, "steps": steps, **{k: record.get(k) for k in EVAL_KEYS},
           **({"eval_overrides": args.eval_override} if args.eval_override else {"reference_images": args.reference_images})}
    row["train_seconds_per_iteration"] = summary.get("seconds_per_iteration")
    row["minutes"] = round((time.time() - t0) / 60, 1)
    row["commands"] = [shlex.join(distill), shlex.join(evaluate)]
    return row


# (key, label, scale, target as a function of the teacher's value, better): the figure's three metrics
FIGURE_METRICS = [("fid", "FID (lower is better)", 1.0, lambda t: 1.25 * t, "1.25x teacher (target)"),
                  ("recall", "recall (higher is better)", 1.0, lambda t: 0.8 * t, "0.8x teacher (target)"),
                  ("class_accuracy", "class accuracy % (higher is better)", 100.0, lambda t: t - 3.0, "teacher - 3 points (target)")]


SEED_SUFFIX = re.compile(r"-seed\d+$")  # a setting rerun with another seed: NAME-seedN (seed=N among its overrides)


def setting_of(name: str) -> str:
    """The setting a row measures, whatever its seed: ``NAME-seedN`` -> ``NAME``."""
    return SEED_SUFFIX.sub("", name)


def seed_of(row: dict) -> int:
    """The row's seed: its ``seed=N`` override, else 0 (every base config's seed)."""
    seeds = [int(o.split("=", 1)[1]) for o in row.get("overrides", []) if o.startswith("seed=")]
    return seeds[-1] if seeds else 0


def by_setting(rows: list[dict]) -> dict[str, dict[int, list[dict]]]:
    """Setting -> budget -> its rows (one per seed)."""
    out: dict[str, dict[int, list[dict]]] = {}
    for r in rows:
        out.setdefault(setting_of(r["name"]), {}).setdefault(r["steps"], []).append(r)
    return out


def spread(members: list[dict], key: str, scale: float = 1.0) -> tuple[float, float, float] | None:
    """Mean, min and max of ``scale * row[key]`` over ``members`` (None when none has it)."""
    values = [scale * r[key] for r in members if r.get(key) is not None]
    return (sum(values) / len(values), min(values), max(values)) if values else None


def seed_groups(rows: list[dict], accuracy: str, teacher: dict) -> list[dict]:
    """Every setting measured with several seeds at one budget: the mean, min and max of FID, recall and
    accuracy over its seeds, and the targets judged on the means (one seed can meet them by luck)."""
    out = []
    for setting, budgets in by_setting(rows).items():
        for steps, members in budgets.items():
            if len({seed_of(r) for r in members}) < 2:
                continue
            entry = {"setting": setting, "steps": steps, "seeds": sorted(seed_of(r) for r in members)}
            for key in ("fid", "recall", accuracy):
                mean, entry[f"{key}_min"], entry[f"{key}_max"] = spread(members, key)
                entry[f"{key}_mean"] = round(mean, 4)
            entry.update(judge(entry["fid_mean"], entry["recall_mean"], entry[f"{accuracy}_mean"], teacher, accuracy))
            out.append(entry)
    return out


def judge(fid: float, recall: float, accuracy_value: float, teacher: dict, accuracy: str) -> dict:
    """Distances to the targets: FID at most 1.25x the teacher's, recall at least 0.8x, accuracy within 3 points."""
    out = {"fid_vs_teacher": round(fid / teacher["fid"], 3), "recall_vs_teacher": round(recall / teacher["recall"], 3),
           f"{accuracy}_vs_teacher_points": round(100 * (accuracy_value - teacher[accuracy]), 1)}
    out["meets_targets"] = out["fid_vs_teacher"] <= 1.25 and out["recall_vs_teacher"] >= 0.8 and out[f"{accuracy}_vs_teacher_points"] >= -3
    return out


def figure(rows: list[dict], teacher: dict | None, path: Path) -> Path:
    """Top: FID, recall and class accuracy of every setting at the budget most of them share (the
    teacher's value and the target as lines; a setting run with several seeds is one bar at their mean,
    its whiskers spanning the seeds); bottom: the same over generator updates for the settings measured
    at several budgets (learning curves, seed means)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = by_setting(rows)
    budget = Counter(r["steps"] for r in rows).most_common(1)[0][0]  # the budget the settings share
    names = list(settings)
    # each setting at the shared budget, or (named in its label) at its last budget when it was not measured there
    shown = {n: budget if budget in budgets else max(budgets) for n, budgets in settings.items()}
    labels = [n + "".join([f" ({shown[n]} updates)" if shown[n] != budget else "",
                           f" ({len(settings[n][shown[n]])} seeds)" if len(settings[n][shown[n]]) > 1 else ""]) for n in names]
    curves = sorted(n for n, budgets in settings.items() if len(budgets) > 1)

    fig, axes = plt.subplots(2, 3, figsize=(16, 4 + 0.3 * len(names)), gridspec_kw={"height_ratios": [max(len(names), 4) / 4, 1.2]})
    for col, (key, label, scale, target, target_label) in enumerate(FIGURE_METRICS):
        bars, curve = axes[0, col], axes[1, col]
        stats = [spread(settings[n][shown[n]], key, scale) for n in names]
        bars.barh(labels, [st[0] if st else 0 for st in stats], color=f"C{col}")
        for i, (n, st) in enumerate(zip(names, stats)):
            if st and len(settings[n][shown[n]]) > 1:  # whiskers: the lowest and highest seed
                bars.errorbar(st[0], i, xerr=[[st[0] - st[1]], [st[2] - st[0]]], fmt="none", color="k", capsize=3, lw=1)
        for n in curves:
            pts = [(steps, st[0]) for steps, members in sorted(settings[n].items()) if (st := spread(members, key, scale))]
            if pts:
                curve.plot(*zip(*pts), marker="o", label=n)
        if teacher is not None and teacher.get(key) is not None:
            t = scale * teacher[key]
            for ax, line in ((bars, bars.axvline), (curve, curve.axhline)):
                line(t, color="k", ls="--", label=f"teacher {t:.3g}")
                line(target(t), color="tab:red", ls=":", label=target_label)
        present = [st[1] for st in stats if st]
        if key == "class_accuracy" and present:  # the settings differ by a few points: start the axis near them
            bars.set_xlim(left=5 * (min(present) // 5) - 5)
        bars.invert_yaxis()
        if col:
            bars.set_yticklabels([])
        bars.set_xlabel(label)
        bars.legend(fontsize=7)
        curve.set_xlabel("generator updates")
        curve.set_ylabel(label.split(" (")[0])
    axes[0, 0].set_title(f"every setting at {budget} generator updates unless its label says (whiskers: spread over seeds)", fontsize=9)
    axes[1, 0].set_title("learning curves, seed means (teacher dashed, target dotted)", fontsize=9)
    handles, curve_labels = axes[1, 0].get_legend_handles_labels()
    curve_lines = [(h, lbl) for h, lbl in zip(handles, curve_labels) if lbl in curves]  # one legend for the curves, below them
    if curve_lines:
        fig.legend(*zip(*curve_lines), loc="lower center", ncol=min(4, len(curve_lines)), fontsize=7)
    fig.tight_layout(rect=(0, 0.03 * (1 + len(curve_lines) // 4), 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def report(row_files: list[Path], teacher_eval: Path, teacher_command: str) -> dict:
    """The study's rows (from the runners' files or earlier reports, first file first) with each one's
    distance to the teacher's targets: FID at most 1.25x, recall at least 0.8x, class (or, for text models,
    subcategory) accuracy within 3 points."""
    record = json.loads(teacher_eval.read_text())
    if "teacher" in record:  # an earlier report: its teacher row, with the command it holds
        record = record["teacher"]
        teacher_command = teacher_command or record.get("command", "")
    teacher = {k: v for k, v in record.items() if k in (*EVAL_KEYS, "steps", "guidance", "nfe")}
    teacher["command"] = teacher_command
    rows, seen, earlier = [], set(), []
    for path in row_files:
        found = json.loads(path.read_text())
        if isinstance(found, dict):  # an earlier report: its own commands are kept with its rows
            earlier += [*found.get("earlier_commands", []), *([found["command"]] if "command" in found else [])]
        for r in found["rows"] if isinstance(found, dict) else found:  # an earlier report, or a runner's list
            key = (r["name"], r["steps"], r["num_samples"])
            if key not in seen:
                seen.add(key)
                rows.append(r)
    # class models are judged on class accuracy; text models (the Twemoji set) on subcategory accuracy
    accuracy = "class_accuracy" if teacher.get("class_accuracy") is not None else "subcategory_accuracy"
    for r in rows:
        r.update(judge(r["fid"], r["recall"], r[accuracy], teacher, accuracy))
    groups = seed_groups(rows, accuracy, teacher)
    return {**({"earlier_commands": earlier} if earlier else {}), "targets": {"fid_vs_teacher_max": 1.25, "recall_vs_teacher_min": 0.8, f"{accuracy}_points_min": -3.0},
            "teacher": teacher, "rows": rows, **({"seed_means": groups} if groups else {})}


def append_row(path: Path, row: dict) -> None:
    """Add ``row`` to the JSON list at ``path``: read again just before writing, so that runners
    sharing a file keep each other's rows, and replaced atomically, so that a crash mid-write
    leaves the previous list."""
    rows = json.loads(path.read_text()) if path.exists() else []
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(rows + [row], indent=1) + "\n")
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON list the rows are added to")
    parser.add_argument("--config", default="configs/distill_swd4_g3.yaml")
    parser.add_argument("--steps", type=int, nargs="+", default=[300], help="generator-update budgets (ascending): one row each")
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--reference-images", type=int, default=None,
                        help="Fashion-MNIST test images behind FID and precision / recall (their features are cached; "
                             "default 1000)")
    parser.add_argument("--eval-override", action="append", default=[], metavar="KEY=VALUE",
                        help="the eval's reference and scorer instead of --reference-images (repeat), e.g. for the Twemoji "
                             "text set: eval.reference=data/twemoji/images eval.twemoji_scorer=shipped")
    parser.add_argument("--runs", type=Path, default=Path("runs/fidelity"))
    parser.add_argument("--swd", default=str(Path(sys.executable).with_name("swd")))
    parser.add_argument("--figure", type=Path, default=None, help="with --report: draw the rows here")
    parser.add_argument("--teacher", type=Path, default=None, help="with --report: the teacher's eval.json, or an earlier report holding its teacher row "
                             "(the targets' reference)")
    parser.add_argument("--report", type=Path, nargs="+", default=None, metavar="ROWS",
                        help="merge these row files (or earlier reports, e.g. results/fidelity.json) with --teacher into --out "
                             "(the study's results file), draw --figure, and stop")
    parser.add_argument("--teacher-command", default="", help="the command behind --teacher's eval.json, for the report")
    parser.add_argument("--setting", nargs="+", action="append", default=[], metavar=("NAME", "KEY=VALUE"),
                        help="a setting: its name, then the overrides of the base config")
    args = parser.parse_args()
    if args.report is not None:
        if args.teacher is None:
            parser.error("--report needs --teacher (the teacher's eval.json)")
        result = {"command": "python " + shlex.join(sys.argv), **report(args.report, args.teacher, args.teacher_command)}
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        if args.figure is not None:
            print(figure(result["rows"], result["teacher"], args.figure))
        return
    if not args.setting:
        parser.error("give at least one --setting NAME [KEY=VALUE ...]")
    if args.eval_override and args.reference_images is not None:
        parser.error("--reference-images and --eval-override both set the eval's reference: give one "
                     "(--eval-override eval.reference_images=N keeps the Fashion-MNIST reference with N images)")
    if args.reference_images is None and not args.eval_override:
        args.reference_images = 1000
    if args.steps != sorted(args.steps):
        parser.error(f"--steps must be ascending (each budget resumes the previous one), got {args.steps}")
    rows = json.loads(args.out.read_text()) if args.out.exists() else []
    done = {(r["name"], r["steps"], r["num_samples"]) for r in rows}
    for name, *overrides in args.setting:
        bad = [o for o in overrides if "=" not in o]
        if bad:
            parser.error(f"setting {name}: {bad[0]!r} is not KEY=VALUE")
        for steps in args.steps:
            if (name, steps, args.num_samples) in done:
                continue
            row = measure_setting(name, overrides, steps, args)
            print(json.dumps({k: row[k] for k in ("name", "steps", "fid", "precision", "recall", "class_accuracy",
                                                  "subcategory_accuracy", "retrieval_top1")}), flush=True)
            append_row(args.out, row)


if __name__ == "__main__":
    main()

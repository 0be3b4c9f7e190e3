"""Before/after timing of one distillation iteration, side by side in one run.

Two worker processes, one per source tree (``--before`` is a git revision, checked out into a
temporary worktree; the other is this checkout), build the same ``swd bench`` training workload.
The coordinator asks them in turn to run one round of iterations, so the two never run at the
same time and both see the same machine state; the median round time is reported.

    python scripts/efficiency.py --before 9976d41 --batch-sizes 16 64 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

WORKER = r"""
import importlib.util, sys, time, json
sys.path.insert(0, sys.argv[1])
import torch
from swd.bench import training_workload
from swd.config import load_config
mode, mmd_only, batch = sys.argv[3], sys.argv[4] == "1", int(sys.argv[5])
if importlib.util.find_spec("swd.registry"):  # the layout since the redesign: grouped distill config, one stage builder
    from swd.distill.trainer import load_teacher
    from swd.schedule import ScaleSchedule
    from swd.train.batches import build_dataset
    config = load_config(sys.argv[2])
    schedule = ScaleSchedule(config.schedule.sizes, config.schedule.sigmas)
    _, run_config, _ = load_teacher(config.distill.teacher, config, schedule)
    dataset = build_dataset(run_config.data, run_config.model)
    work = training_workload("w", config.distill.teacher, config, schedule, dataset, mode, mmd_only, batch, torch.device("cpu"))
else:  # trees before it: flat distill config
    from swd.commands import resolve_checkpoint
    from swd.models import load_model_config
    from swd.train.common import build_dataset
    import yaml
    data = yaml.safe_load(open(sys.argv[2]))
    data["distill"] = FLATTEN(data["distill"])
    config = load_config(None, [f"{k}={json.dumps(v)}" for k, v in FLAT_ITEMS(data)])
    teacher = str(resolve_checkpoint(config.distill.teacher))
    dataset = build_dataset(config.data, load_model_config(teacher))
    work = training_workload("w", teacher, config, dataset, mode, mmd_only, batch, torch.device("cpu"))
n = len(config.schedule.sizes)
print(json.dumps({"ready": True, "swd": __import__("swd").__file__}), flush=True)
for line in sys.stdin:
    t = time.perf_counter()
    for _ in range(n):  # one round = every stage once
        work.run()
    print(json.dumps({"seconds": (time.perf_counter() - t) / n}), flush=True)
""".replace("FLATTEN", "flatten_distill").replace("FLAT_ITEMS", "dotted_items")

# Helpers the worker of an old tree uses to read a config of the grouped layout.
WORKER = '''
RENAMED = {"lora.rank": "lora_rank", "lora.alpha": "lora_alpha", "lora.targets": "lora_targets", "optim.eps": "adam_eps",
           "critic.updates": "critic_updates", "critic.head_layers": "gan_head_layers"}


def flatten_distill(section):
    flat = {}
    for key, value in section.items():
        if isinstance(value, dict):
            for sub, v in value.items():
                flat[RENAMED.get(f"{key}.{sub}", sub)] = v
        else:
            flat[key] = value
    return flat


def dotted_items(data, prefix=""):
    for key, value in data.items():
        if isinstance(value, dict):
            yield from dotted_items(value, f"{prefix}{key}.")
        else:
            yield prefix + key, value
''' + WORKER


def start(src: Path, config: str, mode: str, mmd_only: bool, batch: int) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", WORKER, str(src), config, mode, "1" if mmd_only else "0", str(batch)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT,
    )
    hello = json.loads(proc.stdout.readline())
    print(f"worker ready: {hello['swd']}", file=sys.stderr)
    return proc


def ask(proc: subprocess.Popen) -> float:
    proc.stdin.write("run\n")
    proc.stdin.flush()
    return json.loads(proc.stdout.readline())["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, help="git revision before the efficiency work")
    parser.add_argument("--config", default="configs/distill_swd4.yaml")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--rows", nargs="+", default=["scalewise-full", "fullres-full", "scalewise-mmd"],
                        choices=["scalewise-full", "fullres-full", "scalewise-mmd", "fullres-mmd"], help="iterations to time")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--out", default="results/efficiency.json")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="swd-before-"))
    subprocess.run(["git", "worktree", "add", "--detach", str(tmp / "tree"), args.before], cwd=ROOT, check=True, capture_output=True)
    trees = {"before": tmp / "tree" / "src", "after": ROOT / "src"}
    rows = []
    try:
        for batch in args.batch_sizes:
            for mode, mmd_only in [(r.split("-")[0], r.endswith("-mmd")) for r in args.rows]:
                workers = {k: start(v, args.config, mode, mmd_only, batch) for k, v in trees.items()}
                for _ in range(args.warmup):
                    for w in workers.values():
                        ask(w)
                times = {k: [] for k in workers}
                for _ in range(args.rounds):
                    for k, w in workers.items():
                        times[k].append(ask(w))
                for w in workers.values():
                    w.stdin.close()
                    w.wait()
                med = {k: statistics.median(v) for k, v in times.items()}
                row = {"batch_size": batch, "mode": mode, "loss": "mmd" if mmd_only else "full",
                       "before_s_per_it": med["before"], "after_s_per_it": med["after"],
                       "speedup": med["before"] / med["after"], "raw": times}
                rows.append(row)
                print(f"batch {batch} {mode} {row['loss']}: before {med['before']:.3f} s/it, after {med['after']:.3f} s/it, {row['speedup']:.2f}x", flush=True)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(tmp / "tree")], cwd=ROOT, check=False)
    result = {
        "command": "python " + " ".join(sys.argv),
        "before": args.before,
        "after": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip(),
        "date": time.strftime("%Y-%m-%d"),
        "rows": rows,
    }
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

#!/usr/bin/env bash
# Measures the shipped teacher for the README and results/teacher.json:
# FID (2,000 samples vs the 10k Fashion-MNIST test set), class accuracy, precision / recall, seconds per image,
# for the teacher (28 guided Euler steps) and the undistilled 4-step scale-wise schedule (that of
# the SwD row's config: $SWD4_CONFIG, default configs/distill_swd4.yaml).
# Usage: bash scripts/teacher_report.sh [NUM_SAMPLES]
set -euo pipefail
N="${1:-2000}"
SWD="${SWD:-.venv/bin/swd}"
CFG=configs/fashion_mnist_teacher.yaml
$SWD eval -c "${SWD4_CONFIG:-configs/distill_swd4.yaml}" checkpoint=teacher eval.mode=scalewise eval.num_samples=$N output_dir=runs/report/scalewise --name scalewise-4-undistilled
$SWD eval -c $CFG checkpoint=teacher eval.mode=teacher eval.num_samples=$N output_dir=runs/report/teacher --name teacher-28
.venv/bin/python - "$N" <<'PY'
import json, sys
rows = []
for name, run in [("teacher-28", "teacher"), ("scalewise-4-undistilled", "scalewise")]:
    r = json.load(open(f"runs/report/{run}/eval.json"))
    rows.append({k: r[k] for k in ("name", "steps", "fid", "class_accuracy", "precision", "recall", "seconds_per_image", "num_samples", "nfe", "guidance", "device")}
                | {"command": f"bash scripts/teacher_report.sh {sys.argv[1]}"})
json.dump(rows, open("results/teacher.json", "w"), indent=1)
print(json.dumps(rows, indent=1))
PY

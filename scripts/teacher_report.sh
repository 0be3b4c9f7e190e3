#!/usr/bin/env bash
# Measures the shipped teacher for the README and results/teacher.json:
# FID (2,000 samples vs the 10k Fashion-MNIST test set), class accuracy, precision / recall, seconds per image,
# for the teacher (28 guided Euler steps) and the undistilled 4-step scale-wise schedule (that of
# the SwD row's config: $SWD4_CONFIG, default configs/distill_swd4.yaml).
# Each eval is skipped when its eval.json of NUM_SAMPLES samples exists, so PART lets two lanes share the work
# (scripts/reproduce.sh): scalewise, teacher, json (results/teacher.json from the two), or all (the default).
# Usage: bash scripts/teacher_report.sh [NUM_SAMPLES] [PART]
set -euo pipefail
N="${1:-2000}"
PART="${2:-all}"
SWD="${SWD:-.venv/bin/swd}"
PY="${PY:-.venv/bin/python}"
CFG=configs/fashion_mnist_teacher.yaml

measured() {  # runs/report/$1/eval.json holds N samples
  [ -f "runs/report/$1/eval.json" ] && $PY -c 'import json, sys; sys.exit(json.load(open(sys.argv[1]))["num_samples"] != int(sys.argv[2]))' "runs/report/$1/eval.json" "$N"
}
case "$PART" in
  scalewise|teacher|json|all) ;;
  *) echo "teacher_report.sh: PART must be scalewise, teacher, json or all, got '$PART'" >&2; exit 2 ;;
esac
if [[ "$PART" == scalewise || "$PART" == all ]] && ! measured scalewise; then
  $SWD eval -c "${SWD4_CONFIG:-configs/distill_swd4.yaml}" checkpoint=teacher eval.mode=scalewise eval.num_samples=$N output_dir=runs/report/scalewise --name scalewise-4-undistilled
fi
if [[ "$PART" == teacher || "$PART" == all ]] && ! measured teacher; then
  $SWD eval -c $CFG checkpoint=teacher eval.mode=teacher eval.num_samples=$N output_dir=runs/report/teacher --name teacher-28
fi
if [[ "$PART" == json || "$PART" == all ]]; then
  $PY - "$N" <<'PY'
import json, sys
rows = []
for name, run in [("teacher-28", "teacher"), ("scalewise-4-undistilled", "scalewise")]:
    r = json.load(open(f"runs/report/{run}/eval.json"))
    rows.append({k: r[k] for k in ("name", "steps", "fid", "class_accuracy", "precision", "recall", "seconds_per_image", "num_samples", "nfe", "guidance", "device")}
                | {"command": f"bash scripts/teacher_report.sh {sys.argv[1]}"})
json.dump(rows, open("results/teacher.json", "w"), indent=1)
print(json.dumps(rows, indent=1))
PY
fi

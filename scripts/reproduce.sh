#!/usr/bin/env bash
# The reproduction table: trains the four baseline configs on the shipped teacher for the same
# wall-clock budget (distill.max_minutes in each config), evaluates each student (FID on N samples
# vs the 10k test set, class accuracy), then times every row side by side and writes
# results/reproduction.json and docs/reproduction.png.
#
# Two lanes of one thread each (a 2-core machine). Every step resumes where it stopped: after an
# interruption, run the script again.
# Usage: bash scripts/reproduce.sh [NUM_SAMPLES]
set -euo pipefail
N="${1:-2000}"
SWD="${SWD:-.venv/bin/swd}"
PY="${PY:-.venv/bin/python}"
mkdir -p runs

lane() {
  for pair in "$@"; do
    cfg="${pair%%:*}"; name="${pair##*:}"
    OMP_NUM_THREADS=1 $SWD distill -c "configs/distill_$cfg.yaml" >> "runs/$name.log" 2>&1
  done
  for pair in "$@"; do
    name="${pair##*:}"
    if [ ! -f "runs/$name/eval/eval.json" ]; then
      OMP_NUM_THREADS=1 $SWD eval checkpoint="runs/$name/student" eval.num_samples="$N" output_dir="runs/$name/eval" --name "$name" >> "runs/$name.log" 2>&1
    fi
  done
}

lane swd4:swd-4 fullres2:fullres-2 &
lane fullres4:fullres-4 swd_mmd4:swd-mmd-4 &
wait
$PY scripts/reproduction.py
$PY scripts/results_table.py results/reproduction.json

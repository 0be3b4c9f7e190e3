#!/usr/bin/env bash
# The reproduction table: trains the four baseline configs on the shipped teacher for the same
# compute budget, counted in generator updates (each config's distill.steps: the SwD row's 300 updates
# turned into equal time with the per-iteration ratios `swd bench` measured, results/bench_distill_b16.json),
# evaluates each student (FID on N samples vs the 10k test set, class accuracy, precision / recall),
# measures the teacher rows (scripts/teacher_report.sh), then times every row side by side and writes
# results/reproduction.json and docs/reproduction.png. The SwD row's config is SWD4_CONFIG (default
# configs/distill_swd4.yaml; configs/distill_swd4_g3.yaml is the pre-study one).
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
    OMP_NUM_THREADS=1 $SWD distill -c "$cfg" output_dir="runs/$name" >> "runs/$name.log" 2>&1
  done
  for pair in "$@"; do
    name="${pair##*:}"
    if [ ! -f "runs/$name/eval/eval.json" ]; then
      OMP_NUM_THREADS=1 $SWD eval checkpoint="runs/$name/student" eval.num_samples="$N" output_dir="runs/$name/eval" --name "$name" >> "runs/$name.log" 2>&1
    fi
  done
}

export SWD4_CONFIG="${SWD4_CONFIG:-configs/distill_swd4.yaml}"
lane "$SWD4_CONFIG:swd-4" configs/distill_fullres2.yaml:fullres-2 &
lane configs/distill_fullres4.yaml:fullres-4 configs/distill_swd_mmd4.yaml:swd-mmd-4 &
wait
if [ ! -f runs/report/teacher/eval.json ] || ! grep -q '"recall"' results/teacher.json; then
  OMP_NUM_THREADS=2 SWD="$SWD" bash scripts/teacher_report.sh "$N" > runs/teacher_report.log 2>&1
fi
$PY scripts/reproduction.py --swd4-config "$SWD4_CONFIG"
$PY scripts/results_table.py results/reproduction.json

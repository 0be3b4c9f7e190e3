#!/usr/bin/env bash
# The reproduction table: trains the four baseline configs on the shipped teacher for the same
# compute budget, counted in generator updates (each config's distill.steps: the SwD row's updates
# turned into equal time with the per-iteration ratios `swd bench` measured, results/bench_distill_b16.json),
# evaluates each student (FID on N samples vs the 10k test set, class accuracy, precision / recall),
# measures the teacher rows (scripts/teacher_report.sh), then times every row side by side and writes
# results/reproduction.json and docs/reproduction.png. The SwD row's config is SWD4_CONFIG (default
# configs/distill_swd4.yaml; configs/distill_swd4_g3.yaml is the pre-study one).
#
# A 2-core machine, kept busy: 1) the four distillations in two lanes of one thread each; 2) the 10k-image
# FID reference once, on both threads (every eval then reads it from the cache; two lanes reaching it at
# once would leave one waiting on the cache lock while the other computes it on one thread); 3) the six evals, teacher rows included, in two lanes;
# 4) the side-by-side timing. Every step resumes where it stopped: after an interruption, run the
# script again. About 2.5 hours on an idle 2-core machine (each lane's distillations about 70 minutes).
# Usage: bash scripts/reproduce.sh [NUM_SAMPLES]
set -euo pipefail
N="${1:-2000}"
SWD="${SWD:-.venv/bin/swd}"
PY="${PY:-.venv/bin/python}"
export SWD PY
mkdir -p runs

train() {  # CONFIG:NAME ...
  for pair in "$@"; do
    cfg="${pair%%:*}"; name="${pair##*:}"
    OMP_NUM_THREADS=1 $SWD distill -c "$cfg" output_dir="runs/$name" >> "runs/$name.log" 2>&1
  done
}

measured() {  # runs/$1/eval/eval.json holds N samples
  [ -f "runs/$1/eval/eval.json" ] && $PY -c 'import json, sys; sys.exit(json.load(open(sys.argv[1]))["num_samples"] != int(sys.argv[2]))' "runs/$1/eval/eval.json" "$N"
}

evaluate() {  # NAME (a student under runs/) or teacher:PART (scripts/teacher_report.sh's part) ...
  for item in "$@"; do
    if [[ "$item" == teacher:* ]]; then
      OMP_NUM_THREADS=1 bash scripts/teacher_report.sh "$N" "${item#teacher:}" >> runs/teacher_report.log 2>&1
    elif ! measured "$item"; then
      OMP_NUM_THREADS=1 $SWD eval checkpoint="runs/$item/student" eval.num_samples="$N" output_dir="runs/$item/eval" --name "$item" >> "runs/$item.log" 2>&1
    fi
  done
}

export SWD4_CONFIG="${SWD4_CONFIG:-configs/distill_swd4.yaml}"
train "$SWD4_CONFIG:swd-4" configs/distill_fullres2.yaml:fullres-2 & a=$!
train configs/distill_fullres4.yaml:fullres-4 configs/distill_swd_mmd4.yaml:swd-mmd-4 & b=$!
wait $a; wait $b  # a lane that failed stops the script (its log under runs/ says why)
echo "$(date +%T) distillations done; the FID reference (cached after its first run)"
OMP_NUM_THREADS=2 $PY -c "from swd.metrics.fid import reference_for_fashion_mnist as r; r()" >> runs/reference.log 2>&1
# the guided teacher's 56 network evals per image weigh about two student evals
evaluate swd-4 fullres-2 fullres-4 teacher:scalewise & a=$!
evaluate teacher:teacher swd-mmd-4 & b=$!
wait $a; wait $b
bash scripts/teacher_report.sh "$N" json > /dev/null
echo "$(date +%T) evaluations done; timing every row side by side"
$PY scripts/reproduction.py --swd4-config "$SWD4_CONFIG"
$PY scripts/results_table.py results/reproduction.json

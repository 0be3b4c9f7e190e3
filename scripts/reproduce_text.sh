#!/usr/bin/env bash
# The reproduction table on text: distils the shipped Twemoji text teacher (checkpoint=twemoji-teacher)
# with the four configs/distill_twemoji_*.yaml rows (the same number of generator updates each),
# evaluates all six rows on NUM_SAMPLES training captions (FID against the whole Twemoji set,
# precision / recall, subcategory accuracy and caption retrieval by the shipped Twemoji scorer),
# then times every row side by side and writes results/reproduction_text.json and
# docs/reproduction_text.png.
#
# One job at a time (a 2-core machine). Every step resumes where it stopped: after an
# interruption, run the script again.
# Usage: bash scripts/reproduce_text.sh [NUM_SAMPLES]
set -euo pipefail
N="${1:-2000}"
SWD="${SWD:-.venv/bin/swd}"
PY="${PY:-.venv/bin/python}"
OUT=runs/text_repro
mkdir -p "$OUT"
EVAL=(eval.reference=data/twemoji/images eval.twemoji_scorer=shipped eval.batch_size=100 eval.num_samples="$N")

for pair in swd4:swd-4 fullres4:fullres-4 fullres2:fullres-2 swd_mmd4:swd-mmd-4; do
  cfg="${pair%%:*}"; name="${pair##*:}"
  if [ ! -f "runs/twemoji-$name/train_summary.json" ]; then
    $SWD distill -c "configs/distill_twemoji_$cfg.yaml" 2>&1 | tee -a "$OUT/$name.log"
  fi
done

evaluate() {  # name, then the eval overrides
  local name="$1"; shift
  if [ ! -f "$OUT/$name/eval.json" ]; then
    $SWD eval "$@" "${EVAL[@]}" output_dir="$OUT/$name" --name "$name" 2>&1 | tee -a "$OUT/$name.log"
  fi
}
for name in swd-4 fullres-4 fullres-2 swd-mmd-4; do
  evaluate "$name" checkpoint="runs/twemoji-$name/student"
done
evaluate undistilled-sw-4 checkpoint=twemoji-teacher eval.mode=scalewise
evaluate teacher checkpoint=twemoji-teacher eval.mode=teacher

$PY scripts/reproduction.py --table text
$PY scripts/results_table.py results/reproduction_text.json

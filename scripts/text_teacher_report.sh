#!/usr/bin/env bash
# Ships the Twemoji text teacher trained by `swd pretrain -c configs/twemoji_teacher.yaml` into the
# package (src/swd/assets/twemoji_teacher, reachable as checkpoint=twemoji-teacher) and measures it
# for results/text_teacher.json: FID against the whole Twemoji set (data/twemoji/images), precision /
# recall, subcategory accuracy and caption retrieval (the shipped Twemoji scorer), seconds per image,
# on training captions (the model's default prompts) and, separately, on the held-out captions.
# Usage: bash scripts/text_teacher_report.sh [NUM_SAMPLES] [NUM_HELDOUT_SAMPLES] [RUN_DIR]
set -euo pipefail
N="${1:-300}"
NH="${2:-200}"
RUN="${3:-runs/twemoji_teacher}"
PY="${PY:-.venv/bin/python}"
SWD="${SWD:-.venv/bin/swd}"
ASSET=src/swd/assets/twemoji_teacher
"$PY" - "$RUN" "$ASSET" <<'PY'
import csv, json, random, shutil, sys
from pathlib import Path
run, asset = Path(sys.argv[1]), Path(sys.argv[2])
if asset.exists():
    shutil.rmtree(asset)
shutil.copytree(run / "model", asset)
with open("data/twemoji/metainfo.csv", newline="", encoding="utf-8") as handle:
    captions = [row["caption"] for row in csv.DictReader(handle)]
random.Random(0).shuffle(captions)  # a fixed sample: eval.num_samples images take the first prompts in turn
(asset / "prompts.txt").write_text("\n".join(captions) + "\n", encoding="utf-8")
state = json.loads(max((run / "checkpoints").glob("step_*/swd_state.json")).read_text())
print(f"shipped step {state['step']} to {asset}")
PY
COMMON=(checkpoint=twemoji-teacher eval.reference=data/twemoji/images eval.twemoji_scorer=shipped eval.batch_size=100)
$SWD eval "${COMMON[@]}" eval.mode=teacher eval.num_samples="$N" output_dir=runs/text_report/teacher --name teacher-28
$SWD eval "${COMMON[@]}" eval.mode=scalewise eval.num_samples="$N" output_dir=runs/text_report/scalewise --name undistilled-sw-4
$SWD eval "${COMMON[@]}" eval.mode=teacher eval.num_samples="$NH" eval.prompts=data/twemoji/metainfo_heldout.csv \
    output_dir=runs/text_report/heldout --name teacher-28-heldout-captions
"$PY" - "$N" "$NH" "$RUN" "$ASSET" <<'PY'
import json, sys
from pathlib import Path
n, nh, run, asset = sys.argv[1], sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4])
rows = []
for name, folder in [("teacher-28", "teacher"), ("undistilled-sw-4", "scalewise"), ("teacher-28-heldout-captions", "heldout")]:
    r = json.loads(Path(f"runs/text_report/{folder}/eval.json").read_text())
    keys = ("name", "steps", "nfe", "guidance", "fid", "precision", "recall", "density", "coverage", "subcategory_accuracy",
            "retrieval_top1", "retrieval_top5", "seconds_per_image", "num_samples", "num_prompts", "reference", "device")
    rows.append({k: r.get(k) for k in keys})
size = sum(p.stat().st_size for p in asset.rglob("*") if p.is_file())
params = json.loads((asset / "transformer" / "config.json").read_text())
result = {
    "model": "twemoji-teacher", "train_command": "swd pretrain -c configs/twemoji_teacher.yaml",
    "report_command": f"bash scripts/text_teacher_report.sh {n} {nh}",
    "training": json.loads((run / "train_report.json").read_text()) if (run / "train_report.json").is_file() else None,
    "asset_bytes": size, "transformer_config": {k: params[k] for k in ("num_layers", "num_attention_heads", "attention_head_dim", "in_channels", "sample_size")},
    "rows": rows,
}
Path("results/text_teacher.json").write_text(json.dumps(result, indent=1) + "\n")
print(json.dumps(result, indent=1))
PY

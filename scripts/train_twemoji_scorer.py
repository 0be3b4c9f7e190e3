"""Train the Twemoji prompt-alignment scorer shipped in `src/swd/assets/twemoji_scorer/` and write
its scores on real images to `results/twemoji_scorer.json`.

    bash scripts/install_twemoji.sh                 # data/twemoji
    python scripts/train_twemoji_scorer.py          # defaults; writes the packaged weights
"""

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch

from swd.metrics.twemoji_scorer import DEFAULT_SCORER_DIR, train_scorer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("data/twemoji"))
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_SCORER_DIR)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (results are reproducible per value)")
    parser.add_argument("--results", type=Path, default=Path("results/twemoji_scorer.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    command = shlex.join(["python", "scripts/train_twemoji_scorer.py", *sys.argv[1:]])
    config = train_scorer(args.data, args.out_dir, epochs=args.epochs, command=command)
    summary = {k: config[k] for k in ("real_images", "epochs", "train_seconds", "candidates", "command")}
    args.results.write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()

"""Train the Fashion-MNIST class-alignment classifier shipped in `src/swd/assets/classifier/`.

    python scripts/train_classifier.py                # defaults; writes the packaged weights
    python scripts/train_classifier.py --out-dir /tmp/clf --threads 2
"""

import argparse
import shlex
import sys
from pathlib import Path

import torch

from swd.metrics.classifier import DEFAULT_CLASSIFIER_DIR, train_classifier


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_CLASSIFIER_DIR)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (results are reproducible per value)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    command = shlex.join(["python", "scripts/train_classifier.py", *sys.argv[1:]])
    config = train_classifier(args.out_dir, command=command)
    print(f"test accuracy {config['test_accuracy']:.4f}; wrote {args.out_dir}")


if __name__ == "__main__":
    main()

"""Print a results/*.json file (a list of rows) as a Markdown table: python scripts/results_table.py results/teacher.json"""

import json
import sys

COLUMNS = [("name", "model / sampler", "{}"), ("steps", "steps", "{}"), ("nfe", "network evals / image", "{}"),
           ("fid", "FID", "{:.2f}"), ("class_accuracy", "class accuracy", "{:.1%}"),
           ("subcategory_accuracy", "subcategory accuracy", "{:.1%}"), ("retrieval_top1", "retrieval top-1", "{:.1%}"),
           ("precision", "precision", "{:.3f}"), ("recall", "recall", "{:.3f}"),
           ("seconds_per_image", "seconds / image", "{:.3f}"), ("sample_seconds_per_image", "sampling s / image", "{:.4f}"),
           ("train_seconds_per_iteration", "training s / iteration (in the run)", "{:.2f}"),
           ("train_seconds_per_iteration_side_by_side", "training s / iteration (side by side)", "{:.2f}"), ("train_iterations", "training iterations", "{}"),
           ("train_minutes", "training minutes", "{:.1f}"), ("num_samples", "FID samples", "{}")]


def main(path: str) -> None:
    rows = json.load(open(path))
    cols = [c for c in COLUMNS if any(c[0] in r for r in rows)]
    print("| " + " | ".join(title for _, title, _ in cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(fmt.format(r[key]) if r.get(key) is not None else "-" for key, _, fmt in cols) + " |")


if __name__ == "__main__":
    main(sys.argv[1])

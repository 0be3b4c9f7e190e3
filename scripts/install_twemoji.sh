#!/usr/bin/env bash
# Installs the Twemoji text-to-image set: the npm package emoji-datasource-twitter@16.0.0 (fetched
# from the npm registry with `npm pack`), converted by `python -m swd.twemoji` into the image-folder
# layout swd reads (32 px RGB, metainfo.csv = training split, metainfo_heldout.csv, metainfo_all.csv).
#   bash scripts/install_twemoji.sh [OUT_DIR] [SIZE]    (default data/twemoji, 32)
set -euo pipefail
OUT="${1:-data/twemoji}"
SIZE="${2:-32}"
PYTHON="${PYTHON:-python3}"
if [ -f "$OUT/metainfo_all.csv" ]; then exit 0; fi
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
(cd "$TMP" && npm pack --silent emoji-datasource-twitter@16.0.0 > /dev/null)
"$PYTHON" -m swd.twemoji --package "$TMP/emoji-datasource-twitter-16.0.0.tgz" --out "$OUT" --size "$SIZE"

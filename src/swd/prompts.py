"""Prompt files. ``sample.prompts``, ``make_data.prompts`` and ``eval.prompts`` take them:

- ``.txt`` (or any other suffix): one prompt per line, blank lines skipped;
- ``.csv``: a header row with a ``caption`` or ``prompt`` column (the layout of the COCO and MJHQ
  prompt files); other columns are ignored, blank cells skipped.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence, Union

PROMPT_COLUMNS = ("caption", "prompt")  # the first a .csv has is read
FORMATS = "a .txt file, one prompt per line, or a .csv with a caption or prompt column"


def read_prompts(path: str | Path | None, key: str = "make_data.prompts") -> list[str]:
    """The prompts of a prompt file; a missing or empty file is an error naming ``key``."""
    if not path:
        raise ValueError(f"no prompt file given: set {key}=FILE ({FORMATS})")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist ({key}: {FORMATS})")
    lines = csv_prompts(path, key) if path.suffix.lower() == ".csv" else path.read_text(encoding="utf-8").splitlines()
    prompts = [p for p in (line.strip() for line in lines) if p]
    if not prompts:
        raise ValueError(f"prompt file {path} holds no prompts (only blank lines); write one prompt per line ({key}: {FORMATS})")
    return prompts


def csv_prompts(path: Path, key: str) -> list[str]:
    """The ``caption`` (or else ``prompt``) column of a .csv, blank cells included."""
    with path.open(newline="", encoding="utf-8-sig") as handle:  # utf-8-sig: spreadsheets write a byte-order mark
        reader = csv.DictReader(handle)
        if reader.fieldnames is None:
            raise ValueError(f"prompt file {path} is empty; a .csv needs a header row with a caption or prompt column ({key})")
        columns = {name.strip().lower(): name for name in reader.fieldnames if name}
        found = [columns[c] for c in PROMPT_COLUMNS if c in columns]
        if not found:
            raise ValueError(f"prompt file {path} has no caption or prompt column (columns: {reader.fieldnames}); "
                             f"name the column holding the prompts 'caption' or 'prompt' ({key})")
        return [row[found[0]] or "" for row in reader]


def prompts_from(value: Union[str, Sequence[str], None], key: str) -> list[str] | None:
    """A config's prompts: a list as given, a string as a prompt file, None as None."""
    if value is None:
        return None
    if isinstance(value, str):
        return read_prompts(value, key)
    return list(value)

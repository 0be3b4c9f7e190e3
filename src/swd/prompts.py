"""Prompt files: one prompt per line (blank lines skipped). ``sample.prompts`` and
``make_data.prompts`` take them."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence, Union


def read_prompts(path: str | Path | None, key: str = "make_data.prompts") -> list[str]:
    """The prompts of a text file, one per line; a missing or empty file is an error naming ``key``."""
    if not path:
        raise ValueError(f"no prompt file given: set {key}=FILE (a text file, one prompt per line)")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist ({key}: a text file, one prompt per line)")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise ValueError(f"prompt file {path} holds no prompts (only blank lines); write one prompt per line")
    return prompts


def prompts_from(value: Union[str, Sequence[str], None], key: str) -> list[str] | None:
    """A config's prompts: a list as given, a string as a prompt file, None as None."""
    if value is None:
        return None
    if isinstance(value, str):
        return read_prompts(value, key)
    return list(value)

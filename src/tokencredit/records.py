"""Input records: JSONL and plain-text loading with line-numbered errors."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path


class RecordError(ValueError):
    """A record file that cannot be used; the message names the file and line."""


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Yield (line number, object) for each non-blank line; a bad line raises RecordError naming it."""
    path = Path(path)
    if not path.is_file():
        raise RecordError(f"{path}: no such file")
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise RecordError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from exc
            if not isinstance(obj, dict):
                raise RecordError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj


def load_prompts(
    path: str | Path, prompt_field: str = "prompt", reference_field: str | None = None
) -> tuple[list[str], list[str | None] | None]:
    """Prompts (and optional reference responses) from a .jsonl file or a .txt file with one prompt a line."""
    path = Path(path)
    if path.suffix == ".txt":
        if not path.is_file():
            raise RecordError(f"{path}: no such file")
        prompts = [line.rstrip("\n") for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if reference_field is not None:
            raise RecordError(f"{path}: a .txt prompt file has no fields; reference_field needs .jsonl")
        refs = None
    else:
        prompts, refs_list = [], []
        for lineno, obj in read_jsonl(path):
            value = obj.get(prompt_field)
            if not isinstance(value, str) or not value.strip():
                raise RecordError(f"{path}:{lineno}: field {prompt_field!r} must be a non-empty string")
            prompts.append(value)
            if reference_field is not None:
                ref = obj.get(reference_field)
                if ref is not None and not isinstance(ref, str):
                    raise RecordError(f"{path}:{lineno}: field {reference_field!r} must be a string or null")
                refs_list.append(ref)
        refs = refs_list if reference_field is not None else None
    if not prompts:
        raise RecordError(f"{path}: no prompts found")
    return prompts, refs

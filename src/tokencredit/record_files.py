"""Input records: JSONL and plain-text loading with line-numbered errors."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path


class RecordError(ValueError):
    """A record file that cannot be used; the message names the file and line."""


# One record line larger than this is refused: it is almost surely not a record (a binary file, a dump
# without newlines), and reading it whole could exhaust memory before any other check runs.
MAX_LINE_BYTES = 64 * 1024 * 1024


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of each line, decoded as UTF-8; a bad byte or an endless line names its line."""
    with path.open("rb") as f:
        lineno = 0
        while True:
            raw = f.readline(MAX_LINE_BYTES + 1)
            if not raw:
                return
            lineno += 1
            if len(raw) > MAX_LINE_BYTES:
                raise RecordError(f"{path}:{lineno}: line longer than {MAX_LINE_BYTES // 2**20} MiB; "
                                  "is this a JSONL file with one record a line?")
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise RecordError(f"{path}:{lineno}: not UTF-8 text (byte {raw[exc.start]:#04x} at column "
                                  f"{exc.start + 1}); save the file as UTF-8") from exc


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Yield (line number, object) for each non-blank line; a bad line raises RecordError naming it."""
    path = Path(path)
    if not path.is_file():
        raise RecordError(f"{path}: no such file")
    for lineno, line in _lines(path):
        if lineno == 1 and line.startswith("\ufeff"):
            line = line[1:]  # a byte-order mark, which some editors write, is not part of the record
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise RecordError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from exc
        except RecursionError as exc:
            raise RecordError(f"{path}:{lineno}: JSON nested too deeply") from exc
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
        prompts = [line.rstrip("\r\n") for _, line in _lines(path) if line.strip()]
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

"""FinLoRA data files: JSONL rows {"context", "target"}, read with file:line errors, and their checksums."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from lora.core.errors import DataError

__all__ = ["data_file_problem", "file_sha256", "load_rows"]


def data_file_problem(path: str | Path) -> str | None:
    """Why `path` cannot be read as a data file (missing, a folder, not a regular file), or None."""
    path = Path(path)
    if path.is_dir():
        return f"data file {path} is a folder, expected a JSONL file of {{\"context\", \"target\"}} rows"
    if not path.exists():
        return f"data file {path} does not exist (expected a JSONL file of {{\"context\", \"target\"}} rows)"
    if not path.is_file():
        return f"data file {path} is not a regular file, expected a JSONL file of {{\"context\", \"target\"}} rows"
    return None


def load_rows(path: str | Path, *, required: tuple[str, ...] = ("context", "target")) -> list[dict]:
    """Read a JSONL file of objects with string `required` keys; a `target` must not be empty.

    Raises:
        DataError: naming the file for a missing file or a folder, and file:line for a line that is not UTF-8,
            invalid JSON, or a row without the required strings or with an empty target.
    """
    path = Path(path)
    problem = data_file_problem(path)
    if problem:
        raise DataError(problem + ".")
    rows = []
    with path.open("rb") as handle:  # bytes, so that a line that is not UTF-8 can be named
        for line_number, raw_line in enumerate(handle, start=1):
            where = f"{path}:{line_number}"
            try:
                line = raw_line.decode("utf-8")
            except UnicodeDecodeError as error:
                raise DataError(f"{where}: byte 0x{raw_line[error.start]:02x} at column {error.start + 1} is not "
                                "UTF-8 (save the file as UTF-8).") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{where}: not valid JSON ({error.msg} at column {error.colno}).") from None
            if not isinstance(row, dict):
                expected = ", ".join(required)
                raise DataError(f"{where}: expected a JSON object with {expected}, got {type(row).__name__}.")
            for key in required:
                if key not in row:
                    present = ", ".join(sorted(row)) or "no keys"
                    raise DataError(f'{where}: missing "{key}" (row has {present}; expected {", ".join(required)}).')
                if not isinstance(row[key], str):
                    raise DataError(f'{where}: "{key}" must be a string, got {type(row[key]).__name__}.')
            if "target" in required and not row["target"].strip():
                # An empty answer trains only the end-of-answer token and scores as nothing: a broken row.
                raise DataError(f'{where}: "target" is empty (expected the answer text, e.g. "positive").')
            rows.append(row)
    if not rows:
        raise DataError(f"{path} has no rows.")
    return rows


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

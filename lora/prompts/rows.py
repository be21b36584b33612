"""FinLoRA data files: JSONL rows {"context", "target"}, read with file:line errors, and their checksums."""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

from lora.core.errors import DataError
from lora.core.strict_json import JSONInputError, parse_json

__all__ = [
    "CHARS_PER_TOKEN_BOUND", "check_row_length", "data_file_problem", "file_sha256", "load_rows", "max_row_chars",
]

# A row whose text is longer than this many characters per token of max_seq_length is refused rather than
# tokenised: no tokenizer packs that many characters into a token, so such a row would be cut to under 1/64 of
# itself by the left truncation anyway, and tokenising it first costs minutes and gigabytes (a 40 MB row: 12.7 GB).
CHARS_PER_TOKEN_BOUND = 64


def max_row_chars(max_seq_length: int) -> int:
    """The most characters (context + target) a training row may have under `max_seq_length`."""
    return CHARS_PER_TOKEN_BOUND * max_seq_length


def check_row_length(length: int, max_seq_length: int, where: str) -> None:
    """Refuse a training row of `length` characters (all its text) over `max_row_chars(max_seq_length)`.

    Raises:
        DataError: naming `where` (file:line), the length, the bound and what to do.
    """
    max_chars = max_row_chars(max_seq_length)
    if length > max_chars:
        raise DataError(
            f"{where}: the row holds {length} characters, over the {max_chars} allowed for max_seq_length "
            f"{max_seq_length} ({CHARS_PER_TOKEN_BOUND} characters per token; longer "
            "rows lose all but their end to truncation, and tokenising them costs minutes and gigabytes). "
            "Shorten or split the row, or raise max_seq_length."
        )


def data_file_problem(path: str | Path) -> str | None:
    """Why `path` cannot be read as a data file (missing, a folder, not a regular file), or None."""
    path = Path(path)
    try:
        os.stat(path)
    except OSError as error:
        if error.errno == errno.ELOOP:
            return f"data file {path} is a symlink loop (a link that leads back to itself); point it at the JSONL file"
    if path.is_dir():
        return f"data file {path} is a folder, expected a JSONL file of {{\"context\", \"target\"}} rows"
    if not path.exists():
        return f"data file {path} does not exist (expected a JSONL file of {{\"context\", \"target\"}} rows)"
    if not path.is_file():
        return f"data file {path} is not a regular file, expected a JSONL file of {{\"context\", \"target\"}} rows"
    return None


def load_rows(path: str | Path, *, required: tuple[str, ...] = ("context", "target"),
              max_seq_length: int | None = None) -> list[dict]:
    """Read a JSONL file of objects with string `required` keys; a `target` must not be empty.

    Args:
        path: the JSONL file.
        required: keys every row must have, as strings.
        max_seq_length: when given (training data), a row whose required strings hold more than
            `max_row_chars(max_seq_length)` characters in all is refused before anything tokenises it.

    Raises:
        DataError: naming the file for a missing file or a folder, and file:line for a line that is not UTF-8,
            JSON this tool refuses (lora/core/strict_json.py: NaN, a repeated key, a lone surrogate, ...), a row
            without the required strings, with an empty target, or longer than `max_row_chars(max_seq_length)`.
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
                row = parse_json(line)
            except JSONInputError as error:
                raise DataError(f"{where}: {error.message} (at column {error.column}).") from None
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
            if max_seq_length is not None:
                check_row_length(sum(len(row[key]) for key in required), max_seq_length, where)
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

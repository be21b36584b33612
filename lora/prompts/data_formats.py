"""The data formats a recipe's files may hold, one JSON object per line, read with file:line errors.

    finlora     {"context": "...Answer: ", "target": "positive"}                      (FinLoRA; supervised)
    messages    {"messages": [{"role": "user", "content": "..."},
                              {"role": "assistant", "content": "positive"}]}          (TRL / OpenAI chat; supervised)
    preference  {"prompt": "...", "chosen": "positive", "rejected": "negative"}      (TRL; DPO) - the prompt may be
                FinLoRA's "context"; prompt, chosen and rejected may be conversations (lists of messages), as TRL's
                conversational preference rows are.

"auto" (the default) reads the format off the first row: "messages" -> messages, "chosen" -> preference, else
finlora. Every row of a file must then be of that format.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lora.core.errors import DataError
from lora.prompts.chat import check_conversation, conversation_as_row
from lora.prompts.rows import check_row_length, file_sha256, load_rows

__all__ = ["DataFile", "FORMATS", "detect_format", "read_data_file", "read_scoring_rows", "row_line_numbers"]

FORMATS = ("finlora", "messages", "preference")
_KEYS = {"finlora": '{"context", "target"}', "messages": '{"messages": [...]}',
         "preference": '{"prompt", "chosen", "rejected"}'}


@dataclass
class DataFile:
    """One data file as read: its format, its rows (preference rows with "prompt", never "context") and where each
    row sits (file:line, blank lines skipped)."""

    path: Path
    format: str
    rows: list[dict]
    where: list[str] = field(default_factory=list)

    @property
    def sha256(self) -> str:
        return file_sha256(self.path)


def row_line_numbers(path: Path) -> list[int]:
    """The line number of each row load_rows returns (it skips blank lines)."""
    with Path(path).open("rb") as handle:
        return [number for number, line in enumerate(handle, start=1) if line.strip()]


def detect_format(row: dict) -> str:
    if "messages" in row:
        return "messages"
    if "chosen" in row or "rejected" in row:
        return "preference"
    return "finlora"


def _check_side(value, where: str, key: str, *, prompt: bool) -> None:
    """A preference row's prompt/chosen/rejected: a non-empty string or a conversation."""
    if isinstance(value, str):
        if not prompt and not value.strip():
            raise DataError(f'{where}: "{key}" is empty (expected the answer text).')
        return
    if isinstance(value, list):
        check_conversation(value, f'{where} ("{key}")', need_assistant=not prompt)
        return
    raise DataError(f'{where}: "{key}" must be a string or a list of {{"role", "content"}} messages, got '
                    f"{type(value).__name__}.")


def _preference_row(row: dict, where: str) -> dict:
    if "prompt" in row and "context" in row:
        raise DataError(f'{where}: give the prompt as "prompt" or as FinLoRA\'s "context", not both.')
    prompt_key = "prompt" if "prompt" in row else "context"
    for key in (prompt_key, "chosen", "rejected"):
        if key not in row:
            present = ", ".join(sorted(row)) or "no keys"
            raise DataError(f'{where}: missing "{key}" (row has {present}; expected {_KEYS["preference"]}, the '
                            'prompt may be FinLoRA\'s "context").')
    _check_side(row[prompt_key], where, prompt_key, prompt=True)
    _check_side(row["chosen"], where, "chosen", prompt=False)
    _check_side(row["rejected"], where, "rejected", prompt=False)
    conversational = [isinstance(row[key], list) for key in (prompt_key, "chosen", "rejected")]
    if any(conversational) and not all(conversational):
        raise DataError(f'{where}: prompt, chosen and rejected must all be strings or all be lists of messages '
                        "(TRL's plain or conversational preference rows), not a mix.")
    if row["chosen"] == row["rejected"]:
        raise DataError(f'{where}: "chosen" and "rejected" are the same; a pair teaches a preference only when '
                        "they differ.")
    return {**{k: v for k, v in row.items() if k != prompt_key}, "prompt": row[prompt_key]}


def _text_length(value) -> int:
    """The characters of every string in a row's value (a conversation's contents, a preference side)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        return sum(_text_length(item) for item in value)
    if isinstance(value, dict):
        return sum(_text_length(value.get(key)) for key in ("content", "prompt", "chosen", "rejected", "messages"))
    return 0


def read_data_file(path: str | Path, data_format: str = "auto", *, label: str = "data file",
                   max_seq_length: int | None = None) -> DataFile:
    """Read a data file in `data_format` ("auto": from the first row), checking every row.

    Args:
        label: what the file is to the user (e.g. 'datasets[1]'), said when a row is of another format.
        max_seq_length: when given (training data), a row whose text is longer than lora.prompts.rows
            .max_row_chars(max_seq_length) is refused before anything tokenises it, in every format.

    Raises:
        DataError: naming file:line for a row that is not JSON, not of the file's format, or malformed in it
            (a chat row: unknown role, content not a string, no assistant turn).
    """
    path = Path(path)
    if data_format not in ("auto", *FORMATS):
        raise DataError(f'{label} {path}: format "{data_format}" is not one of auto, {", ".join(FORMATS)}.')
    raw = load_rows(path, required=())
    lines = row_line_numbers(path)
    where = [f"{path}:{line}" for line in lines[: len(raw)]]
    found = detect_format(raw[0])
    data_format = found if data_format == "auto" else data_format
    rows = []
    for row, location in zip(raw, where, strict=True):
        kind = detect_format(row)
        if kind != data_format:
            raise DataError(f"{location}: a {kind} row ({_KEYS[kind]}) in a {data_format} file ({label} expects "
                            f"{_KEYS[data_format]} on every line).")
        if data_format == "messages":
            check_conversation(row["messages"], location)
            rows.append(row)
        elif data_format == "preference":
            rows.append(_preference_row(row, location))
        else:
            rows.append(row)
        if data_format != "finlora" and max_seq_length is not None:
            check_row_length(_text_length(rows[-1]), max_seq_length, location)
    if data_format == "finlora":
        # FinLoRA rows: the reader's own checks (strings, non-empty target, length) and messages
        rows = load_rows(path, max_seq_length=max_seq_length)
    return DataFile(path=path, format=data_format, rows=rows, where=where)


def read_scoring_rows(path: str | Path) -> list[dict]:
    """Rows the evaluation harness scores, as {"context", "target"}: FinLoRA rows as they are, chat rows as the
    conversation up to their last assistant turn (the prompt) and that turn (the answer).

    Raises:
        DataError: as read_data_file; and for preference rows, which hold no single answer to score.
    """
    data = read_data_file(path, label="task data")
    if data.format == "preference":
        raise DataError(f"{data.path}: preference rows hold two answers, not one to score; give a task file of "
                        '{"context", "target"} or {"messages": [...]} rows.')
    if data.format == "messages":
        return [conversation_as_row(row["messages"], where) for row, where in zip(data.rows, data.where, strict=True)]
    return data.rows

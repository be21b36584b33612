"""Deterministic parsing of generated text into answers, compatible with FinLoRA's scoring.

FinLoRA decodes prompt + output and keeps the text after the last "Answer:"; our prompts end in "Answer: "
(or a chat assistant turn), so applying the same rule to the generated continuation gives the same answer.

Label rule (classification): the label mentioned EARLIEST in the answer wins, matched case-insensitively as a
whole word (not preceded or followed by a letter or digit: "negative" is not found in "negatively"). Ties, i.e.
two labels found at the same position because one starts the other ("positive" / "positive outlook"), go to the
LONGER label, then to the label listed first in the task. Never hash order: the result depends only on the text
and the task's label list. No mention at all -> None, scored as wrong (and counted in "unparsed").
"""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = [
    "ANSWER_MARKER",
    "answer_text",
    "label_positions",
    "match_label",
    "NO_ENTITIES",
    "normalise_text",
    "NUMBER",
    "parse_entities",
    "parse_label",
    "parse_number",
]

ANSWER_MARKER = re.compile(r"answer\s*:", re.IGNORECASE)
# A number not glued to a word before it ("Q3" is no number); it ends where no digit follows ("0.77x" -> 0.77).
NUMBER = re.compile(r"(?<![\w.])([-+\u2212]?)\$?\s?(\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)(?![\d.]*\d)")
NO_ENTITIES = {"none", "no entities", "n/a", ""}


def answer_text(output: str) -> str:
    """The text after the last "Answer:" in `output` (all of it when there is none), stripped."""
    matches = list(ANSWER_MARKER.finditer(output))
    if matches:
        output = output[matches[-1].end() :]
    return output.strip()


def normalise_text(text: str) -> str:
    """Lowercase, single spaces, no surrounding whitespace or trailing full stop: for exact-match answers."""
    return " ".join(text.lower().split()).rstrip(".").strip()


def label_positions(text: str, labels: Sequence[str]) -> list[tuple[int, int, int, str]]:
    """(start, -length, rank, label) of every whole-word mention of a label; sorted, the first one wins."""
    found = []
    for rank, label in enumerate(labels):
        pattern = r"(?<![A-Za-z0-9])" + re.escape(label.lower()) + r"(?![A-Za-z0-9])"
        match = re.search(pattern, text.lower())
        if match:
            found.append((match.start(), -len(label), rank, label))
    return sorted(found)


def match_label(text: str, labels: Sequence[str]) -> str | None:
    """The earliest-mentioned label in `text` (ties: longer label, then task order), or None."""
    positions = label_positions(text, labels)
    return positions[0][3] if positions else None


def parse_label(output: str, labels: Sequence[str]) -> str | None:
    """FinLoRA rule: the answer after the last "Answer:", then its earliest label mention."""
    return match_label(answer_text(output), labels)


def parse_number(text: str) -> float | None:
    """The first number in `text`: thousands separators, a sign, a leading "$" and a trailing "%" are allowed
    ("$1,234.5" -> 1234.5, "-3%" -> -3.0, "Q3 sales 12" -> 12.0). None when there is no number."""
    match = NUMBER.search(text)
    if not match:
        return None
    sign = -1.0 if match.group(1) in ("-", "\u2212") else 1.0
    return sign * float(match.group(2).replace(",", ""))


def parse_entities(text: str, entity_types: Sequence[str]) -> list[tuple[str, str]]:
    """'Name, TYPE; Name, TYPE' (or 'none') -> [(name, TYPE)], names lowercased with single spaces.

    Items without a known type are dropped (they can only be wrong); the type check is case-insensitive.
    """
    text = text.strip()
    if normalise_text(text) in NO_ENTITIES:
        return []
    allowed = {entity_type.upper() for entity_type in entity_types}
    entities = []
    for item in text.replace("\n", ";").split(";"):
        name, comma, entity_type = item.rpartition(",")
        entity_type = entity_type.strip().rstrip(".").upper()
        name = " ".join(name.split()).lower()
        if comma and name and (not allowed or entity_type in allowed):
            entities.append((name, entity_type))
    return entities

"""The one JSON reader for what users hand this tool (registries, --set values, data rows, task files).

Python's `json` accepts what JSON (RFC 8259) does not, and each acceptance turned a user's typo into a crash far
from its cause: `NaN`, `Infinity` and numbers too large for a float (`1e999` becomes inf), a key given twice in one
object (the last silently wins), strings holding half of a UTF-16 surrogate pair (`"\\ud800"`, which no UTF-8 file
or tokenizer can hold), and documents nested so deeply that the parser's recursion gives out (RecursionError).
`parse_json` refuses each of them with the line and column where it sits. `schema_validator` checks a parsed
document against a JSON Schema where, unlike in JSON Schema itself, 100.0 and true are not integers.

The fast path is the C parser with three cheap hooks; only when something is refused does a second, linear scan of
the text find where it sits.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

__all__ = ["JSONInputError", "parse_json", "schema_validator"]

# One token of a JSON text (whitespace skipped between tokens); used only to locate a problem the parser found.
_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[{}\[\]:,]|-?Infinity|NaN|-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?|true|false|null',
                    re.S)
_MAX_INT_DIGITS = 1000
_ESCAPED_SURROGATE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


class JSONInputError(ValueError):
    """A JSON text this tool refuses; `line` and `column` (1-based) say where, `message` what and what to write."""

    def __init__(self, message: str, line: int, column: int):
        super().__init__(f"{line}:{column}: {message}")
        self.message, self.line, self.column = message, line, column


class _Refused(Exception):
    def __init__(self, kind: str, detail: str = ""):
        super().__init__(kind)
        self.kind, self.detail = kind, detail


def _no_constant(name: str) -> Any:
    raise _Refused("non-finite", name)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Refused("non-finite", text)
    return value


def _bounded_int(text: str) -> int:
    if len(text) > _MAX_INT_DIGITS:  # int() itself refuses past sys.get_int_max_str_digits() with a bare ValueError
        raise _Refused("long-int", text)
    return int(text)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise _Refused("duplicate")
    return result


def parse_json(text: str) -> Any:
    """`json.loads(text)`, refusing NaN/Infinity, overflowing numbers, integers of over 1000 digits, repeated keys,
    lone surrogates and documents nested past the parser's recursion limit.

    Raises:
        JSONInputError: with the line and column of the first problem and a one-sentence explanation.
    """
    try:
        value = json.loads(text, parse_constant=_no_constant, parse_float=_finite_float,
                           parse_int=_bounded_int, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as error:
        raise JSONInputError(f"not valid JSON: {error.msg}", error.lineno, error.colno) from None
    except _Refused as refused:
        raise _locate(text, refused.kind) from None
    except RecursionError:
        raise _locate(text, "depth") from None
    if "\\u" in text and _ESCAPED_SURROGATE.search(text):
        _check_surrogates(text, value)
    return value


def _check_surrogates(text: str, value: Any) -> None:
    """Raise when a string of `value` (keys included) holds a lone surrogate (escaped pairs are fine)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise _locate(text, "surrogate") from None


def _position(text: str, offset: int) -> tuple[int, int]:
    line = text.count("\n", 0, offset) + 1
    return line, offset - (text.rfind("\n", 0, offset) + 1) + 1


def _locate(text: str, kind: str) -> JSONInputError:
    """Scan the tokens of `text` for the first problem of `kind`; the error names where it sits."""
    objects: list[set | None] = []  # per open container: the keys seen so far (None for an array)
    previous = ""
    deepest, deepest_at = 0, 0
    for match in _TOKEN.finditer(text):
        token, start = match.group(), match.start()
        if token in "{[":
            objects.append(set() if token == "{" else None)
            if len(objects) > deepest:
                deepest, deepest_at = len(objects), start
        elif token in "}]":
            if objects:
                objects.pop()
        elif token[0] == '"':
            if kind == "duplicate" and objects and objects[-1] is not None and previous in ("{", ","):
                key = json.loads(token)
                if key in objects[-1]:
                    return JSONInputError(f"key {json.dumps(key)} is given twice in one object (the later one would "
                                          "silently win; keep one)", *_position(text, start))
                objects[-1].add(key)
            if kind == "surrogate" and _has_lone_surrogate(token):
                return JSONInputError("this string holds a lone UTF-16 surrogate (a \\ud800-\\udfff escape without "
                                      "its pair), which is not text; remove it or give the full pair",
                                      *_position(text, start))
        elif kind == "long-int" and token[0] in "-0123456789" and len(token) > _MAX_INT_DIGITS:
            return JSONInputError(f"a number of {len(token)} digits is too long to be any value this tool reads; give "
                                  "a number of at most a few digits", *_position(text, start))
        elif kind == "non-finite" and token[0] in "-0123456789IN" and (token[-1] in "yN"
                                                                     or not math.isfinite(float(token))):
            return JSONInputError(f"{token} is not a finite number (JSON has no NaN or Infinity, and a float cannot "
                                  "hold it); give a finite number", *_position(text, start))
        previous = token
    if kind == "depth":
        return JSONInputError(f"nested {deepest} levels deep, past what the JSON reader can follow (the deepest "
                              "level starts here); nothing this tool reads nests more than a few levels",
                              *_position(text, deepest_at))
    return JSONInputError(f"refused ({kind})", 1, 1)  # not reached for a text the parser refused


def _has_lone_surrogate(token: str) -> bool:
    try:
        json.loads(token).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _is_integer(checker, instance) -> bool:
    # JSON Schema counts 100.0 as an integer; this tool does not: `lora_r: 1e2` or `seed: 1e30` is a float in every
    # JSON reader and crashed the run (peft, numpy) after passing --dry-run. Booleans are not integers either.
    return isinstance(instance, int) and not isinstance(instance, bool)


def schema_validator(schema: dict):
    """A JSON Schema (draft 2020-12) validator for `schema` whose "integer" admits Python ints only."""
    import jsonschema  # here: the reader above needs only the standard library

    checker = jsonschema.Draft202012Validator.TYPE_CHECKER.redefine("integer", _is_integer)
    return jsonschema.validators.extend(jsonschema.Draft202012Validator, type_checker=checker)(schema)

"""Errors a user can cause, and the one place that turns them into exit code 2.

Bugs still raise with a traceback; anything the user can fix (a recipe field, a data row, a model id) raises a
`UserError` subclass whose message names the recipe/field/file:line, what was expected and the nearest valid value.
"""

from __future__ import annotations

import difflib
import functools
import sys
from collections.abc import Callable, Iterable

__all__ = [
    "closest",
    "DataError",
    "did_you_mean",
    "exit_on_user_error",
    "EXIT_USER_ERROR",
    "ModelSourceError",
    "OutputError",
    "RecipeError",
    "UserError",
]

EXIT_USER_ERROR = 2


class UserError(Exception):
    """Something the user can fix; printed as one paragraph, exit code 2, no traceback."""


class RecipeError(UserError):
    """A recipe or registry is invalid, or a recipe name is unknown."""


class DataError(UserError):
    """A dataset file is missing or a row is malformed (the message carries file:line)."""


class ModelSourceError(UserError):
    """A base model cannot be found locally nor reached on the hub."""


class OutputError(UserError):
    """The output folder holds a finished run and neither overwrite nor resume was asked for."""


def closest(name: str, candidates: Iterable[str]) -> str | None:
    """The most similar candidate to `name`, or None when nothing is close enough to suggest."""
    matches = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return matches[0] if matches else None


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """' (did you mean "x"?)' when a close candidate exists, else an empty string."""
    match = closest(name, candidates)
    return f' (did you mean "{match}"?)' if match else ""


def exit_on_user_error(main: Callable[..., int | None]) -> Callable[..., int]:
    """Wrap a CLI main so that a UserError prints `error: <message>` on stderr and exits with code 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs) or 0
        except UserError as error:
            print(f"error: {error}", file=sys.stderr)
            return EXIT_USER_ERROR

    return wrapper

"""One writer per output: a lock beside every folder or file a command writes, held for the whole command.

Two runs into one output folder (two `--overwrite`s, a `--resume` beside an `--overwrite`, two plain runs, a merge
and a merge) would share hidden build folders and publish over each other. Every command that writes an output
takes `hold_output_lock(out)` first: a second one exits 2 at once naming the process that holds it.

The lock is an OS file lock (`filelock`, flock on Unix) on a hidden sibling `.<name>.lock`; the kernel releases it
when its process dies, so kill -9 never leaves a stuck lock. Who holds it is written to `.<name>.lock.owner` after
the lock is taken (the lock file itself is truncated by every process that tries it), and read only by a process
that failed to take it.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock, Timeout

from lora.core.errors import OutputError

__all__ = ["hold_output_lock", "lock_path_for"]

# Locks this process holds: lock path -> (thread that holds it, depth). A command that holds an output and calls a
# library function that takes the same output's lock (a sweep trial calling run_recipe) nests; another thread of the
# same process is refused like another process.
_HELD: dict[Path, tuple[int, int]] = {}
_HELD_GUARD = threading.Lock()


def lock_path_for(output: Path) -> Path:
    """The lock file that guards `output` (a hidden sibling, so it never lands inside what is published)."""
    output = Path(output)
    return output.parent / f".{output.name}.lock"


def _owner_path(lock_path: Path) -> Path:
    return lock_path.with_name(lock_path.name + ".owner")


def _describe_owner(lock_path: Path) -> str:
    try:
        owner = _owner_path(lock_path).read_text(encoding="utf-8").strip()
    except OSError:
        owner = ""
    return owner or "another process (it has not yet said which)"


@contextlib.contextmanager
def hold_output_lock(output: Path | str) -> Iterator[Path]:
    """Hold the one-writer lock of `output` for the `with` block, or raise at once when another process holds it.

    Args:
        output: the folder or file a command is about to write (it need not exist yet; its parent is created).

    Yields:
        The lock file's path.

    Raises:
        OutputError: another live process holds the lock; the message names its pid, command line and start time.
    """
    output = Path(output).absolute()
    output.parent.mkdir(parents=True, exist_ok=True)
    lock_path = lock_path_for(output)
    me = threading.get_ident()
    with _HELD_GUARD:
        holder = _HELD.get(lock_path)
        if holder is not None and holder[0] == me:
            _HELD[lock_path] = (me, holder[1] + 1)
            nested = True
        else:
            nested = False
    if nested:
        try:
            yield lock_path
        finally:
            with _HELD_GUARD:
                _HELD[lock_path] = (me, _HELD[lock_path][1] - 1)
        return
    lock = FileLock(str(lock_path), timeout=0, thread_local=False)
    try:
        lock.acquire()
    except Timeout:
        raise OutputError(
            f"{output} is being written by {_describe_owner(lock_path)}. One command writes an output at a time: "
            "wait for it to finish (or stop it), then run this command again."
        ) from None
    owner_path = _owner_path(lock_path)
    command = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv and sys.argv[0] else "python"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
    with _HELD_GUARD:
        _HELD[lock_path] = (me, 1)
    try:
        owner_path.write_text(f"process {os.getpid()} ({command}), since {started}\n", encoding="utf-8")
        yield lock_path
    finally:
        with _HELD_GUARD:
            del _HELD[lock_path]
        with contextlib.suppress(OSError):
            owner_path.unlink()
        lock.release()

"""Writing outputs safely: atomic JSON, new files with the umask's mode, folders moved into place only when complete,
and a cheap readability check of saved files."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

__all__ = [
    "file_problem",
    "finish_interrupted_replacement",
    "fsync_path",
    "move_into_place",
    "new_file_mode",
    "remove_tree",
    "write_json_atomic",
]


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write JSON to a temporary sibling and rename it into place, with the mode any other output file gets."""
    path = Path(path)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as handle:
        json.dump(payload, handle, indent=2, default=str)
        handle.write("\n")
        temp_name = handle.name
    os.chmod(temp_name, new_file_mode())  # mkstemp creates 0600 whatever the umask says
    os.replace(temp_name, path)


def new_file_mode() -> int:
    """The mode open() gives a new file under this process's umask (0644 under the usual 022)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def fsync_path(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def file_problem(path: Path) -> str | None:
    """Why a saved file cannot be read back (truncated, corrupt), or None when it reads.

    Checks what can be checked without loading it all: safetensors headers against the file size (safetensors
    refuses a file its header does not fully cover), torch pickles as the zip archives torch.save writes (their
    CRCs), JSON by parsing. Other files are not checked.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt"):
                pass
        elif path.suffix in (".pt", ".pth", ".bin"):
            with zipfile.ZipFile(path) as archive:
                damaged = archive.testzip()
            if damaged is not None:
                return f"{path.name} is corrupt (its part {damaged} fails its checksum)"
        elif path.suffix == ".json":
            json.loads(path.read_text(encoding="utf-8"))
    except SafetensorError as error:
        return f"{path.name} is truncated or corrupt ({error})"
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
        return f"{path.name} cannot be read ({error})"
    return None


def _replacement_journal(out: Path) -> Path:
    return out.parent / f".{out.name}.replacing.json"


def move_into_place(build: Path, out: Path) -> None:
    """Rename a finished build folder to `out`, replacing an old `out` in a way the next command can recover.

    Replacing takes two renames (old `out` aside, build into place). Before the first one a journal
    (`.<name>.replacing.json`) names both folders; it is removed only once the old one is gone. A process killed
    between the renames leaves the journal, and `finish_interrupted_replacement` completes the swap.
    """
    build, out = Path(build), Path(out)
    if not out.exists() and not out.is_symlink():
        build.rename(out)
        fsync_path(out.parent)
        return
    old = out.with_name(f".{out.name}.old-{time.time_ns()}")
    journal = _replacement_journal(out)
    write_json_atomic(journal, {"new": build.name, "old": old.name, "output": out.name})
    fsync_path(out.parent)
    out.rename(old)
    build.rename(out)
    fsync_path(out.parent)
    _remove_path(old)
    journal.unlink()
    fsync_path(out.parent)


def _remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def finish_interrupted_replacement(out: Path) -> str | None:
    """Complete a replacement of `out` that a killed process left half done; say what was done, or None.

    A replacement starts only once its new build is complete, so the rule is to complete it: the new build goes into
    place and the old `out` is removed. Only when the new build is gone (removed by hand) is the swap undone: the old
    `out` comes back. Call it while holding `out`'s lock (lora.core.locks), before looking at `out`.
    """
    out = Path(out)
    journal = _replacement_journal(out)
    if not journal.is_file():
        return None
    try:
        names = json.loads(journal.read_text(encoding="utf-8"))
        new, old = out.parent / Path(names["new"]).name, out.parent / Path(names["old"]).name
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise OSError(f"{journal} (an interrupted replacement of {out}) cannot be read: {error}") from None
    out_there = out.exists() or out.is_symlink()
    if new.exists():
        if out_there and old.exists():
            raise OSError(f"{journal}: {out}, {new} and {old} all exist; resolve the interrupted replacement by hand")
        if out_there:
            out.rename(old)
        new.rename(out)
        said = f"completed an interrupted replacement of {out}: the new output is in place, the previous one removed"
    elif out_there:
        said = f"completed an interrupted replacement of {out}: the previous output removed"
    elif old.exists():
        old.rename(out)
        said = f"undid an interrupted replacement of {out}: its new build is gone, so the previous output is back"
    else:
        raise OSError(f"{journal}: neither {out}, its new build {new.name} nor the previous {old.name} exists")
    fsync_path(out.parent)
    if old.exists() or old.is_symlink():
        _remove_path(old)
    journal.unlink()
    fsync_path(out.parent)
    return said

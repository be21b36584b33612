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

__all__ = ["file_problem", "fsync_path", "move_into_place", "new_file_mode", "remove_tree", "write_json_atomic"]


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


def move_into_place(build: Path, out: Path) -> None:
    """Rename a finished build folder to `out`; an old `out` is moved aside first and removed after the rename."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{int(time.time())}")
        out.rename(old)
    build.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)

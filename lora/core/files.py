"""Writing outputs safely: atomic JSON, new files with the umask's mode, folders moved into place only when complete,
and a cheap readability check of saved files."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from lora.core.errors import OutputError

__all__ = [
    "check_output_folder",
    "claim_output_folder",
    "file_problem",
    "finish_interrupted_replacement",
    "fsync_path",
    "move_into_place",
    "new_file_mode",
    "new_folder_mode",
    "OutputClaim",
    "refuse_output_over_inputs",
    "remove_tree",
    "write_json_atomic",
]


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write JSON to a temporary sibling and rename it into place, with the mode any other output file gets."""
    path = Path(path)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as handle:
        temp_name = handle.name
        try:
            json.dump(payload, handle, indent=2, default=str)
            handle.write("\n")
        except BaseException:
            handle.close()
            os.unlink(temp_name)  # a payload that cannot be written (or a full disk) leaves no half file behind
            raise
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


# Outputs a command writes whole (merge, normalise, convert, the lm-eval export): one rule for where such an output
# may go and what it may replace, and one way to build and publish it.


def new_folder_mode() -> int:
    """The mode mkdir gives a new folder under this process's umask (0755 under the usual 022)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o777 & ~umask


def _real_path(path: Path) -> Path | None:
    try:
        return path.resolve()
    except (OSError, RuntimeError):  # a symlink loop: nothing readable there
        return None


def refuse_output_over_inputs(out: Path | str, inputs: Iterable[tuple[str, Path | str | None]]) -> None:
    """Raise when an output is, contains or lies inside one of the command's inputs (symlinks resolved on both sides).

    Replacing such an output would delete or change what the command reads (an adapter, a base model, a data file);
    writing inside an input changes a folder the user handed over only to be read. Inputs that do not exist locally
    (a hub id, a missing optional file) are skipped: there is nothing there to lose.

    Args:
        out: the folder or file the command writes.
        inputs: (what it is, path) pairs, e.g. ("the adapter folder", Path("outputs/x")); None paths are skipped.

    Raises:
        OutputError: naming the output, the input, and how they overlap.
    """
    out = Path(out).expanduser()
    real_out = _real_path(out.absolute())
    if real_out is None:
        raise OutputError(f"the output {out} is a symlink loop; choose another output.")
    for what, path in inputs:
        if path is None or str(path) == "":
            continue
        path = Path(path).expanduser().absolute()
        real = _real_path(path) if path.exists() or path.is_symlink() else None
        if real is None:
            continue
        if real_out == real:
            relation = "is"
        elif real in real_out.parents:
            relation = "lies inside"
        elif real_out in real.parents:
            relation = "contains"
        else:
            continue
        shown = f"{path}" + (f" (= {real})" if real != path else "")
        shown_out = f"{out}" + (f" (= {real_out})" if real_out != out.absolute() else "")
        raise OutputError(
            f"the output {shown_out} {relation} {what} {shown}, which this command reads: it never writes over or "
            "into its own inputs (replacing the output would delete them). Choose an output outside it."
        )


def _listing(folder: Path, limit: int = 8) -> str:
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    return ", ".join(entries[:limit]) + (f" and {len(entries) - limit} more" if len(entries) > limit else "")


def check_output_folder(out: Path | str, *, overwrite: bool, record: str, made_by: str, kind: str,
                        inputs: Iterable[tuple[str, Path | str | None]] = (), flag: str = "--out") -> None:
    """The one rule for a folder a command writes whole: where it may go and what it may replace.

    Refused: an output that is, contains or lies inside an input (`refuse_output_over_inputs`); an output that is a
    file (these commands write folders); an existing folder without `overwrite`; and, even with `overwrite`, a
    non-empty folder that does not carry `record`, the file this command writes into every output of its own (a
    folder this tool did not write is never replaced).

    Args:
        out: the output folder.
        overwrite: replacing an earlier output of this command was asked for (--overwrite).
        record: the file that marks an output of this command (merge_record.json, conversion.json, ...).
        made_by: the command, as the messages name it (e.g. "lora/merge.py").
        kind: what its outputs are, for the messages (e.g. "a merged model").
        inputs: what the command reads, as for `refuse_output_over_inputs`.
        flag: the option that names the output, for the messages.

    Raises:
        OutputError: with one paragraph naming the output, what is in the way and what to do.
    """
    out = Path(out).expanduser().absolute()
    refuse_output_over_inputs(out, inputs)
    if out.is_symlink() and not out.exists():
        raise OutputError(f"{flag} {out} is a symlink to nothing ({os.readlink(out)}); name a folder.")
    if out.exists() and not out.is_dir():
        raise OutputError(f"{flag} {out} is a file, and {made_by} writes a folder: name a folder instead (the file "
                          "is left as it is).")
    if not out.is_dir():
        return
    ours = (out / record).is_file()
    if not ours and any(out.iterdir()):
        raise OutputError(
            f"{flag} {out} is not {kind} written by this tool (it has no {record}, which {made_by} writes into "
            f"each; it holds: {_listing(out)}), so it is never replaced. Choose another {flag}, or empty that folder "
            "yourself."
        )
    if not overwrite:
        raise OutputError(f"{out} already exists. Choose another output folder, or pass --overwrite to replace it "
                          "(only once the new output is complete).")


@dataclasses.dataclass(frozen=True)
class OutputClaim:
    """An output folder this process holds the lock of (see `claim_output_folder`): build beside it, then publish.

    Attributes:
        out: the output folder (absolute, symlinks resolved).
        build_dir: the hidden sibling the new output is built in (`.<name>.build`).
    """

    out: Path
    build_dir: Path
    recheck: Callable[[], None]

    def new_build(self) -> Path:
        """An empty build folder with the umask's mode (what a killed earlier command left there is removed first:
        the name belongs to this output, and only the holder of its lock writes it)."""
        _remove_path(self.build_dir)
        self.build_dir.mkdir(mode=0o777)  # mkdir applies the umask, as for any folder a user creates
        return self.build_dir

    def publish(self) -> None:
        """Give the build the modes any new file and folder gets, flush it, and move it into place (journalled).

        The output is checked again first: the lock keeps our own commands away, not a user's hand.
        """
        self.recheck()
        file_mode, folder_mode = new_file_mode(), new_folder_mode()
        for path in sorted(self.build_dir.rglob("*")):
            if path.is_symlink():
                continue
            if path.is_dir():
                path.chmod(folder_mode)
            else:
                path.chmod(file_mode)  # safetensors and temporary files are written 0600 whatever the umask
                fsync_path(path)
        self.build_dir.chmod(folder_mode)
        fsync_path(self.build_dir)
        move_into_place(self.build_dir, self.out)


@contextlib.contextmanager
def claim_output_folder(out: Path | str, *, overwrite: bool, record: str, made_by: str, kind: str,
                        inputs: Iterable[tuple[str, Path | str | None]] = (), flag: str = "--out",
                        say: Callable[[str], None] = print) -> Iterator[OutputClaim]:
    """Hold `out` for a whole command: its lock, an interrupted replacement finished, the output rule checked.

    Every command that writes a folder whole runs inside this block: a second command on the same output exits 2 at
    once naming this process (lora.core.locks); a replacement that a killed command left half done is completed or
    undone first, and `say` is told which; then `check_output_folder` decides whether `out` may be written. A build
    that was not published when the block ends (an error) is removed.

    Args:
        out, overwrite, record, made_by, kind, inputs, flag: as for `check_output_folder`.
        say: where to report a finished interrupted replacement (one line).

    Yields:
        The `OutputClaim`: `new_build()` before writing, `publish()` once everything is written.

    Raises:
        OutputError: another process writes `out`, or `check_output_folder` refuses it.
    """
    from lora.core.locks import hold_output_lock

    inputs = tuple(inputs)
    given = Path(out).expanduser().absolute()
    refuse_output_over_inputs(given, inputs)  # before the lock: its file goes beside `out`, maybe inside an input
    if given.is_symlink() and not given.exists():
        raise OutputError(f"{flag} {given} is a symlink to nothing ({os.readlink(given)}); name a folder.")
    out = _real_path(given)
    if out is None:
        raise OutputError(f"{flag} {given} is a symlink loop; name a folder.")
    with hold_output_lock(out):
        try:
            said = finish_interrupted_replacement(out)
        except OSError as error:  # a journal that cannot be acted on: the user decides, nothing is guessed
            raise OutputError(f"{error}. {made_by} leaves {out} alone until then.") from None
        if said:
            say(f"{made_by}: {said}")

        def recheck() -> None:
            check_output_folder(out, overwrite=overwrite, record=record, made_by=made_by, kind=kind, inputs=inputs,
                                flag=flag)

        recheck()
        claim = OutputClaim(out=out, build_dir=out.parent / f".{out.name}.build", recheck=recheck)
        try:
            yield claim
        finally:
            if claim.build_dir.exists():
                _remove_path(claim.build_dir)

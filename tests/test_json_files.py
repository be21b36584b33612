"""lora.core.files: JSON written whole or not at all, damaged files named, a build moved into a new output."""

from __future__ import annotations

import json
import os
import stat
import tempfile
from pathlib import Path

import pytest

from lora.core.files import new_file_mode, write_json_atomic


def test_written_json_is_the_payload_pretty_printed_with_a_final_newline(tmp_path):
    target = tmp_path / "run_summary.json"
    payload = {"status": "completed", "steps": 3, "losses": [1.5, 0.25], "path": Path("/data/x.jsonl")}
    write_json_atomic(target, payload)
    expected = json.dumps({**payload, "path": "/data/x.jsonl"}, indent=2) + "\n"
    assert target.read_text() == expected  # values JSON cannot hold are written as their str()
    assert stat.S_IMODE(target.stat().st_mode) == new_file_mode()
    write_json_atomic(target, {"status": "running"})  # replaces the old content whole
    assert json.loads(target.read_text()) == {"status": "running"}
    assert [p.name for p in tmp_path.iterdir()] == ["run_summary.json"]


def test_the_temporary_file_is_a_sibling_of_the_target(tmp_path, monkeypatch):
    # A rename is atomic only within one filesystem: the temporary file must not go to the system temp folder.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no-such-temp-folder"))
    write_json_atomic(tmp_path / "record.json", {"a": 1})
    assert json.loads((tmp_path / "record.json").read_text()) == {"a": 1}


def test_a_payload_that_cannot_be_written_leaves_the_old_file_and_nothing_else(tmp_path):
    target = tmp_path / "record.json"
    target.write_text('{"old": true}\n')
    circular: dict = {}
    circular["self"] = circular
    with pytest.raises(ValueError):
        write_json_atomic(target, circular)
    assert target.read_text() == '{"old": true}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["record.json"]  # no half-written temporary file


def test_file_problem_names_truncated_and_corrupt_files_and_passes_intact_ones(tmp_path):
    import torch
    from safetensors.torch import save_file

    from lora.core.files import file_problem, remove_tree

    weights, state, record, other = (tmp_path / n for n in ("a.safetensors", "rng.pth", "r.json", "notes.txt"))
    save_file({"w": torch.ones(64, 64)}, str(weights))
    torch.save({"step": 3, "x": torch.arange(1000)}, state)
    record.write_text('{"step": 3}')
    other.write_text("anything")
    assert [file_problem(p) for p in (weights, state, record, other)] == [None, None, None, None]

    weights.write_bytes(weights.read_bytes()[:-100])
    assert file_problem(weights).startswith("a.safetensors is truncated or corrupt (")
    corrupt = bytearray(state.read_bytes())
    index = corrupt.index(b"data/0") + 200  # inside the stored tensor: the archive still opens, its CRC fails
    corrupt[index] ^= 0xFF
    state.write_bytes(bytes(corrupt))
    assert file_problem(state) == "rng.pth is corrupt (its part rng/data/0 fails its checksum)"
    state.write_bytes(b"not a zip")
    assert file_problem(state).startswith("rng.pth cannot be read (")
    for suffix in (".pt", ".bin"):  # the other names torch.save files go by
        saved = tmp_path / f"optimizer{suffix}"
        torch.save({"x": torch.arange(10)}, saved)
        assert file_problem(saved) is None
        saved.write_bytes(b"not a zip")
        assert file_problem(saved).startswith(f"optimizer{suffix} cannot be read (")
    record.write_text('{"step": ')
    assert file_problem(record).startswith("r.json cannot be read (")
    assert file_problem(tmp_path / "missing.json").startswith("missing.json cannot be read (")

    folder = tmp_path / "tree"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "f").write_text("x")
    remove_tree(folder)
    remove_tree(folder)  # already gone: not an error
    assert not folder.exists()


def test_moving_a_build_into_a_new_output_leaves_only_the_output(tmp_path):
    from lora.core.files import finish_interrupted_replacement, move_into_place

    build, out = tmp_path / ".out.build", tmp_path / "out"
    build.mkdir()
    (build / "marker.txt").write_text("new")
    move_into_place(build, out)
    assert (out / "marker.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no journal, no hidden sibling
    assert finish_interrupted_replacement(out) is None


def test_new_files_get_the_mode_the_umask_gives(tmp_path):
    previous = os.umask(0o022)
    try:
        assert new_file_mode() == 0o644
        os.umask(0o077)
        assert new_file_mode() == 0o600
        write_json_atomic(tmp_path / "private.json", {})
        assert stat.S_IMODE((tmp_path / "private.json").stat().st_mode) == 0o600
    finally:
        os.umask(previous)


@pytest.mark.parametrize("kind", ["file", "symlink"])
def test_an_output_that_is_a_file_or_a_symlink_is_replaced_and_a_link_target_kept(tmp_path, kind):
    from lora.core.files import move_into_place

    out, build, target = tmp_path / "out", tmp_path / ".out.build", tmp_path / "kept"
    target.mkdir()
    (target / "user.txt").write_text("mine")
    if kind == "file":
        out.write_text("an old output file")
    else:
        out.symlink_to(target, target_is_directory=True)
    build.mkdir()
    (build / "marker.txt").write_text("new")
    move_into_place(build, out)
    assert not out.is_symlink() and (out / "marker.txt").read_text() == "new"
    assert (target / "user.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept", "out"]


def test_interrupted_replacements_left_in_each_state_are_finished_or_named(tmp_path):
    from lora.core.files import finish_interrupted_replacement

    out, old, journal = tmp_path / "out", tmp_path / ".out.old-1", tmp_path / ".out.replacing.json"
    record = json.dumps({"new": ".out.build", "old": old.name, "output": "out"})
    # killed after both renames, before the old output was removed: the new one stays, the old one goes
    out.mkdir()
    old.mkdir()
    journal.write_text(record)
    said = finish_interrupted_replacement(out)
    assert said == f"completed an interrupted replacement of {out}: the previous output removed"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    # nothing left to go on, or everything at once, or a journal that cannot be read: an error naming the journal
    journal.write_text(record)
    (tmp_path / ".out.build").mkdir()
    old.mkdir()
    with pytest.raises(OSError, match=r"\.out\.replacing\.json: .*all exist; resolve the interrupted replacement by "):
        finish_interrupted_replacement(out)
    for folder in (out, old, tmp_path / ".out.build"):
        folder.rmdir()
    with pytest.raises(OSError, match=r"\.out\.replacing\.json: neither .* nor the previous \.out\.old-1 exists"):
        finish_interrupted_replacement(out)
    journal.write_text('{"new": ')
    with pytest.raises(OSError, match=r"\.out\.replacing\.json \(an interrupted replacement of .*out\) cannot be read"):
        finish_interrupted_replacement(out)


def test_json_is_written_through_a_hidden_sibling_named_after_the_file(tmp_path):
    """What a killed write leaves behind (a process dies between the two steps) is a dotfile that names the file it
    was for, beside it; never a half-written file under the real name or a stray tmp* name."""
    seen = []

    class ListsTheFolderWhileWritten:
        def __str__(self):  # json.dump's default=str calls this halfway through the write
            seen.extend(path.name for path in tmp_path.iterdir())
            return "probe"

    write_json_atomic(tmp_path / "record.json", {"value": ListsTheFolderWhileWritten()})
    assert len(seen) == 1 and seen[0].startswith(".record.json.")
    assert [path.name for path in tmp_path.iterdir()] == ["record.json"]

"""lora.core.files: JSON written whole or not at all, damaged files named, a build moved into a new output."""

from __future__ import annotations

import json
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


def test_a_payload_that_cannot_be_written_leaves_the_old_file_and_nothing_visible(tmp_path):
    target = tmp_path / "record.json"
    target.write_text('{"old": true}\n')
    circular: dict = {}
    circular["self"] = circular
    with pytest.raises(ValueError):
        write_json_atomic(target, circular)
    assert target.read_text() == '{"old": true}\n'
    assert all(p.name.startswith(".") for p in tmp_path.iterdir() if p != target)


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

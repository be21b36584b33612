"""The two primitives every writing command stands on: one writer per output, and a replacement that a kill between
its renames cannot lose (lora.core.locks, lora.core.files)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lora.core.errors import OutputError
from lora.core.files import finish_interrupted_replacement, move_into_place
from lora.core.locks import hold_output_lock

REPO = Path(__file__).resolve().parents[1]


def _folder(path: Path, marker: str) -> Path:
    path.mkdir()
    (path / "marker.txt").write_text(marker)
    return path


def test_a_second_writer_is_refused_and_told_who_holds_the_output(tmp_path):
    out = tmp_path / "run"
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO)!r})
        from lora.core.locks import hold_output_lock
        with hold_output_lock({str(out)!r}):
            print("held", flush=True)
            time.sleep(60)
    """)
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputError, match=rf"being written by process {holder.pid} "):
            with hold_output_lock(out):
                pass
    finally:
        holder.kill()
        holder.wait()
    # the kernel drops a killed holder's lock: nothing stays stuck
    with hold_output_lock(out):
        pass


def test_a_lock_nests_in_the_thread_that_holds_it_and_refuses_another_thread(tmp_path):
    import threading

    refused = []

    def other_thread():
        try:
            with hold_output_lock(tmp_path / "x"):
                refused.append(False)
        except OutputError:
            refused.append(True)

    with hold_output_lock(tmp_path / "x"):
        with hold_output_lock(tmp_path / "x"):  # a command holding its output calls a library part that locks it
            pass
        worker = threading.Thread(target=other_thread)
        worker.start()
        worker.join()
    assert refused == [True]
    with hold_output_lock(tmp_path / "x"):  # released whole once the outer hold ends
        pass


def test_replacing_leaves_only_the_new_folder(tmp_path):
    out, build = _folder(tmp_path / "out", "old"), _folder(tmp_path / ".out.build", "new")
    move_into_place(build, out)
    assert (out / "marker.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert finish_interrupted_replacement(out) is None


@pytest.mark.parametrize("renames_done", [0, 1, 2])
def test_a_replacement_killed_between_its_renames_is_completed_by_the_next_command(tmp_path, renames_done):
    out, build = _folder(tmp_path / "out", "old"), _folder(tmp_path / ".out.build", "new")
    # run move_into_place in a child that dies (os._exit, no cleanup) after `renames_done` renames
    script = textwrap.dedent(f"""
        import os, sys
        from pathlib import Path
        sys.path.insert(0, {str(REPO)!r})
        from lora.core import files
        done = 0
        real_rename = Path.rename
        def rename_then_maybe_die(self, target):
            global done
            if done == {renames_done}:
                os._exit(9)
            done += 1
            return real_rename(self, target)
        Path.rename = rename_then_maybe_die
        files.move_into_place(Path({str(build)!r}), Path({str(out)!r}))
        os._exit(0)
    """)
    code = subprocess.run([sys.executable, "-c", script]).returncode
    assert code == (0 if renames_done == 2 else 9)
    if renames_done == 2:
        assert finish_interrupted_replacement(out) is None
    else:
        said = finish_interrupted_replacement(out)
        assert said.startswith("completed an interrupted replacement")
    assert (out / "marker.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_replacement_whose_new_build_vanished_is_undone(tmp_path):
    out, build = _folder(tmp_path / "out", "old"), _folder(tmp_path / ".out.build", "new")
    old = tmp_path / ".out.old-1"
    (tmp_path / ".out.replacing.json").write_text(f'{{"new": "{build.name}", "old": "{old.name}", "output": "out"}}')
    out.rename(old)
    build.rename(tmp_path / "elsewhere")
    said = finish_interrupted_replacement(out)
    assert said.startswith("undid")
    assert (out / "marker.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "out"]
    assert not os.path.exists(old)

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


# ---- the output rule and publishing, each at its edges -----------------------------------------------------------


def _check(out, **changes):
    from lora.core.files import check_output_folder

    settings = {"overwrite": False, "record": "merge_record.json", "made_by": "lora/merge.py", "kind": "a merged model"}
    check_output_folder(out, **{**settings, **changes})


def test_a_folder_this_tool_did_not_write_is_refused_showing_what_it_holds(tmp_path):
    for count, shown in ((8, "e0, e1, e2, e3, e4, e5, e6/, e7/"), (10, "e0, e1, e2, e3, e4, e5, e6/, e7/ and 2 more")):
        out = tmp_path / f"holds_{count}"
        out.mkdir()
        for index in range(count):  # files, then folders (shown with a slash)
            (out / f"e{index}").mkdir() if index >= 6 else (out / f"e{index}").write_text("")
        with pytest.raises(OutputError) as refused:
            _check(out, overwrite=True)
        assert str(refused.value) == (
            f"--out {out} is not a merged model written by this tool (it has no merge_record.json, which lora/merge.py "
            f"writes into each; it holds: {shown}), so it is never replaced. Choose another --out, or empty that "
            "folder yourself.")


def test_an_output_that_is_a_file_or_a_dangling_symlink_is_refused_and_left_alone(tmp_path):
    a_file = tmp_path / "merged"
    a_file.write_text("mine")
    with pytest.raises(OutputError) as refused:
        _check(a_file, overwrite=True, flag="--output-dir")
    assert str(refused.value) == (f"--output-dir {a_file} is a file, and lora/merge.py writes a folder: name a folder "
                                  "instead (the file is left as it is).")
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(OutputError) as refused:
        _check(dangling)
    assert str(refused.value) == f"--out {dangling} is a symlink to nothing ({tmp_path / 'nowhere'}); name a folder."
    assert a_file.read_text() == "mine" and dangling.is_symlink()
    (tmp_path / "real").mkdir()
    linked = tmp_path / "linked"
    linked.symlink_to(tmp_path / "real")
    _check(linked, overwrite=True)  # a symlink to an empty folder is an output like the folder itself


def test_a_published_build_has_the_modes_any_new_file_and_folder_gets_past_its_symlinks(tmp_path):
    from lora.core.files import claim_output_folder, new_file_mode, new_folder_mode

    out = tmp_path / "merged"
    with claim_output_folder(out, overwrite=False, record="merge_record.json", made_by="lora/merge.py",
                             kind="a merged model", say=lambda _: None) as claim:
        build = claim.new_build()
        assert build.stat().st_mode & 0o7777 == new_folder_mode()
        (build / "a_link").symlink_to("merge_record.json")  # sorted first: the files after it still get their modes
        (build / "merge_record.json").write_text("{}")
        (build / "sub").mkdir(mode=0o700)
        (build / "sub" / "weights.safetensors").write_text("")
        for path in (build / "merge_record.json", build / "sub" / "weights.safetensors"):
            path.chmod(0o600)  # as safetensors and temporary files are written
        claim.publish()
    assert (out / "merge_record.json").stat().st_mode & 0o777 == new_file_mode()
    assert (out / "sub" / "weights.safetensors").stat().st_mode & 0o777 == new_file_mode()
    assert (out / "sub").stat().st_mode & 0o777 == new_folder_mode() == out.stat().st_mode & 0o777
    assert (out / "a_link").is_symlink()


def test_an_output_over_an_input_is_refused_naming_both_real_paths_and_missing_inputs_are_skipped(tmp_path,
                                                                                                   monkeypatch):
    from lora.core.files import refuse_output_over_inputs

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (tmp_path / "via_link").symlink_to(adapter)
    tail = ", which this command reads: it never writes over or into its own inputs (replacing the output would " \
           "delete them). Choose an output outside it."
    # skipped inputs (none, empty, not there) come first: the real one after them is still checked
    inputs = [("an optional file", None), ("the data file", ""), ("a hub id", tmp_path / "org" / "model"),
              ("the adapter folder", tmp_path / "via_link")]
    monkeypatch.chdir(tmp_path)  # "" would be the working folder, which holds every output below
    with pytest.raises(OutputError) as refused:
        refuse_output_over_inputs(adapter / "merged", inputs)
    link, merged = tmp_path / "via_link", adapter / "merged"
    assert str(refused.value) == f"the output {merged} lies inside the adapter folder {link} (= {adapter}){tail}"
    with pytest.raises(OutputError) as refused:
        refuse_output_over_inputs(tmp_path, [("the adapter folder", adapter)])
    assert str(refused.value) == f"the output {tmp_path} contains the adapter folder {adapter}{tail}"
    refuse_output_over_inputs(tmp_path / "org" / "model" / "merged", inputs[:3])  # nothing there to lose
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    with pytest.raises(OutputError) as refused:
        refuse_output_over_inputs(loop, inputs)
    assert str(refused.value) == f"the output {loop} is a symlink loop; choose another output."


def test_an_earlier_output_of_the_command_is_replaced_only_when_asked(tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "merge_record.json").write_text("{}")
    with pytest.raises(OutputError) as refused:
        _check(out)
    assert str(refused.value) == (f"{out} already exists. Choose another output folder, or pass --overwrite to replace "
                                  "it (only once the new output is complete).")
    _check(out, overwrite=True)

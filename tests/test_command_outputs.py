"""The commands around training write their outputs as the runner does: never over, around or inside what they read,
never over a file or a folder they did not write, one command per output at a time, a replacement a kill left half
done finished first, and files with the modes any new file gets.

The commands are lora/merge.py, lora/normalize_dora.py, lora/convert_adapter.py and eval/evaluate.py
--export-lm-eval, each run through its real entry point on the tiny local Llama; every refusal is exit code 2 with a
message, and what was in the way is checked byte for byte afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from test_convert_adapter import ALL_LINEAR, torchtune_tensors, write_nvlabs_checkpoint
from test_merge import save_random_adapter

from eval.evaluate import main as evaluate_main
from eval.harness.lm_eval_export import MARKER
from lora.adapters.convert import CONVERSION_RECORD
from lora.adapters.folders import NORMALISED_RECORD
from lora.adapters.merge import MERGE_RECORD
from lora.convert_adapter import main as convert_main
from lora.core.files import new_file_mode, new_folder_mode
from lora.merge import main as merge_main
from lora.normalize_dora import main as normalize_main

REPO_ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ("merge", "normalize", "convert", "export")
RECORDS = {"merge": MERGE_RECORD, "normalize": NORMALISED_RECORD, "convert": CONVERSION_RECORD, "export": MARKER}


@pytest.fixture(scope="module")
def sources(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    """What the commands read: a DoRA adapter and the same adapter as an NVlabs checkpoint."""
    root = tmp_path_factory.mktemp("sources")
    dora = save_random_adapter(tiny_model_dir, root / "dora", use_dora=True, target_modules=ALL_LINEAR)
    return {"base": tiny_model_dir, "dora": dora, "nvlabs": write_nvlabs_checkpoint(dora, root / "nvlabs")}


def run_command(name: str, sources: dict[str, Path], out: Path, overwrite: bool = True) -> int:
    """Run one command's main on the shared inputs, writing `out`; returns its exit code."""
    flag = ["--overwrite"] if overwrite else []
    if name == "merge":
        return merge_main([str(sources["dora"]), "--out", str(out), *flag])
    if name == "normalize":
        return normalize_main(["-i", str(sources["dora"]), "-o", str(out), *flag])
    if name == "convert":
        return convert_main(["--from", "nvlabs", "-i", str(sources["nvlabs"]), "-o", str(out), "--allow-pickle", *flag])
    # the export has no --overwrite: it always replaces an earlier export of its own, and nothing else
    return evaluate_main(["--base-model", str(sources["base"]), "--tasks", "sentiment", "--limit", "4",
                          "--export-lm-eval", str(out)])


def snapshot(folder: Path) -> dict[str, bytes | str]:
    """Every entry under `folder` (itself included): file bytes, symlink targets, folders."""
    entries = {}
    for path in [folder, *sorted(folder.rglob("*"))] if folder.is_dir() else [folder]:
        key = str(path.relative_to(folder.parent))
        if path.is_symlink():
            entries[key] = "-> " + os.readlink(path)
        elif path.is_dir():
            entries[key] = "folder"
        else:
            entries[key] = path.read_bytes()
    return entries


def hidden_leftovers(folder: Path) -> list[str]:
    """Hidden entries a command left in `folder`, except the one-writer lock file (empty, kept on purpose)."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") and not p.name.endswith(".lock"))


def user_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "notes.txt").write_text("my notes")
    (path / "data").mkdir()
    (path / "data" / "rows.jsonl").write_text('{"x": 1}\n')
    return path


# Item 1: an output that is, contains or lies inside an input is refused (symlinks resolved).


def test_merge_refuses_an_output_that_contains_its_adapter(sources, tmp_path, capsys):
    m5 = user_folder(tmp_path / "m5")
    shutil.copytree(sources["dora"], m5 / "ad")
    before = snapshot(m5)
    assert merge_main([str(m5 / "ad"), "--out", str(m5), "--overwrite"]) == 2
    assert f"the output {m5} contains the adapter folder {m5 / 'ad'}" in capsys.readouterr().err
    assert snapshot(m5) == before and hidden_leftovers(tmp_path) == []


def test_merge_refuses_to_replace_the_base_model_it_merges_into(sources, tmp_path, capsys):
    m6 = tmp_path / "m6"
    shutil.copytree(sources["base"], m6 / "base")
    shutil.copytree(sources["dora"], m6 / "ad")
    before = snapshot(m6)
    assert merge_main([str(m6 / "ad"), "--base-model", str(m6 / "base"), "--out", str(m6 / "base"),
                       "--overwrite"]) == 2
    assert f"the output {m6 / 'base'} is the base model folder {m6 / 'base'}" in capsys.readouterr().err
    assert snapshot(m6) == before


def test_an_output_reached_through_a_symlink_or_inside_an_input_is_refused(sources, tmp_path, capsys):
    m7 = user_folder(tmp_path / "m7")
    shutil.copytree(sources["dora"], m7 / "ad")
    (tmp_path / "alias").symlink_to(m7, target_is_directory=True)
    before = snapshot(m7)
    assert merge_main([str(m7 / "ad"), "--out", str(tmp_path / "alias"), "--overwrite"]) == 2
    assert f"(= {m7}) contains the adapter folder" in capsys.readouterr().err
    assert normalize_main(["-i", str(m7 / "ad"), "-o", str(m7 / "ad" / "normalised")]) == 2
    assert "lies inside the adapter folder" in capsys.readouterr().err
    assert snapshot(m7) == before and (tmp_path / "alias").is_symlink()
    assert hidden_leftovers(tmp_path) == [] and hidden_leftovers(m7 / "ad") == hidden_leftovers(sources["dora"])


def test_normalize_refuses_an_output_that_contains_its_adapter(sources, tmp_path, capsys):
    folder = user_folder(tmp_path / "n")
    shutil.copytree(sources["dora"], folder / "ad")
    before = snapshot(folder)
    assert normalize_main(["-i", str(folder / "ad"), "-o", str(folder), "--overwrite"]) == 2
    assert "contains the adapter folder" in capsys.readouterr().err
    assert snapshot(folder) == before


def test_convert_refuses_an_output_that_holds_its_checkpoint_file(sources, tmp_path, capsys):
    checkpoint = user_folder(tmp_path / "tt")
    torch.save(torchtune_tensors(sources["dora"]), checkpoint / "adapter_model.pt")
    before = snapshot(checkpoint)
    common = ["--from", "torchtune", "--base-model", str(sources["base"]), "--lora-alpha", "8", "--allow-pickle"]
    assert convert_main([*common, "-i", str(checkpoint / "adapter_model.pt"), "-o", str(checkpoint),
                         "--overwrite"]) == 2
    assert f"contains the checkpoint {checkpoint / 'adapter_model.pt'}" in capsys.readouterr().err
    assert convert_main([*common, "-i", str(checkpoint), "-o", str(checkpoint / "peft")]) == 2
    assert "lies inside the checkpoint" in capsys.readouterr().err
    assert snapshot(checkpoint) == before
    # a checkpoint file may have its output as a sibling: the folder beside it is not read
    assert convert_main([*common, "-i", str(checkpoint / "adapter_model.pt"), "-o", str(checkpoint / "peft")]) == 0


def test_eval_results_and_export_never_hold_the_adapter_or_the_data(sources, tmp_path, capsys):
    data = tmp_path / "res" / "sentiment.json"
    data.parent.mkdir()
    data.write_text("".join(json.dumps({"context": f"Input: up {i}\nAnswer: ", "target": "positive"}) + "\n"
                            for i in range(3)))
    before = snapshot(data.parent)
    # results named after the task would be written over the data file they score
    assert evaluate_main(["--base-model", str(sources["base"]), "--data", f"sentiment={data}",
                          "--out", str(data.parent)]) == 2
    assert f'contains the data file of task "sentiment" {data}' in capsys.readouterr().err
    adapter = tmp_path / "ad"
    shutil.copytree(sources["dora"], adapter)
    (adapter / "recipe.json").write_text(json.dumps({"base_model": str(sources["base"]), "quant_bits": None}))
    assert evaluate_main(["--adapter", str(adapter), "--tasks", "sentiment", "--out", str(adapter)]) == 2
    assert "contains the adapter's file" in capsys.readouterr().err
    assert evaluate_main(["--adapter", str(adapter), "--tasks", "sentiment", "--export-lm-eval", str(adapter)]) == 2
    assert "contains the adapter's file" in capsys.readouterr().err
    assert snapshot(data.parent) == before
    assert sorted(p.name for p in adapter.iterdir()) == sorted([*(p.name for p in sources["dora"].iterdir()),
                                                                "recipe.json"])


def test_finetune_refuses_an_output_dir_inside_its_base_model(sources, tmp_path, capsys):
    from lora.finetune import main as finetune_main

    base = tmp_path / "base"
    shutil.copytree(sources["base"], base)
    before = snapshot(base)
    registry = tmp_path / "finetune_configs.json"
    registry.write_text(json.dumps({"tiny": {
        "base_model": str(base), "dataset_path": str(REPO_ROOT / "data/train/sentiment_train.jsonl"),
        "quant_bits": None, "max_train_examples": 8, "max_steps": 1, "batch_size": 4, "lora_r": 4, "lora_alpha": 8,
        "max_seq_length": 64}}))
    assert finetune_main(["tiny", "--registry", str(registry), "--output-dir", str(base / "run")]) == 2
    assert f"the output {base / 'run'} lies inside the base model folder {base}" in capsys.readouterr().err
    assert snapshot(base) == before


# Item 1 (a file as output) and the brief's rule: never replace what this tool did not write.


@pytest.mark.parametrize("name", COMMANDS)
def test_an_output_that_is_a_file_is_refused_and_left_alone(name, sources, tmp_path, capsys):
    target = tmp_path / "notes.txt"
    target.write_text("my notes")
    assert run_command(name, sources, target) == 2
    assert f"{target} is a file" in capsys.readouterr().err
    assert target.read_text() == "my notes" and hidden_leftovers(tmp_path) == []


@pytest.mark.parametrize("name", COMMANDS)
def test_overwrite_never_replaces_a_folder_the_command_did_not_write(name, sources, tmp_path, capsys):
    mine = user_folder(tmp_path / "mine")
    (mine / "merge_record.json" if name != "merge" else mine / "conversion.json").write_text("{}")  # another's record
    before = snapshot(mine)
    assert run_command(name, sources, mine) == 2
    error = capsys.readouterr().err
    assert f"is not {'an' if name == 'export' else 'a'}" in error and f"(it has no {RECORDS[name]}" in error
    assert "it holds: " in error and "notes.txt" in error and "data/" in error
    assert snapshot(mine) == before and hidden_leftovers(tmp_path) == []


@pytest.mark.parametrize("name", COMMANDS)
def test_overwrite_replaces_an_earlier_output_with_the_modes_any_new_file_gets(name, sources, tmp_path, capsys):
    umask = os.umask(0o022)
    try:
        out = tmp_path / "out"
        assert run_command(name, sources, out) == 0
        (out / "stale.txt").write_text("from before")
        assert run_command(name, sources, out) == 0  # over its own earlier output
        assert (out / RECORDS[name]).is_file() and not (out / "stale.txt").exists()
        modes = {str(p.relative_to(tmp_path)): p.stat().st_mode & 0o777 for p in [out, *out.rglob("*")]}
        expected = {path: new_folder_mode() if (tmp_path / path).is_dir() else new_file_mode() for path in modes}
        assert modes == expected and new_folder_mode() == 0o755 and new_file_mode() == 0o644
        assert hidden_leftovers(tmp_path) == []
    finally:
        os.umask(umask)


# Item 2: the export never deletes what sits beside it.


@pytest.mark.parametrize("beside", ["folder", "file", "symlink"])
def test_export_over_an_earlier_export_leaves_what_is_beside_it(beside, sources, tmp_path, capsys):
    out = tmp_path / "lm_eval_tasks"
    assert run_command("export", sources, out) == 0
    previous = tmp_path / "lm_eval_tasks.previous"
    if beside == "folder":
        user_folder(previous)
    elif beside == "file":
        previous.write_text("my notes")
    else:
        previous.symlink_to(tmp_path / "elsewhere")
    before = snapshot(previous)
    assert run_command("export", sources, out) == 0
    assert snapshot(previous) == before and (out / MARKER).is_file()
    assert hidden_leftovers(tmp_path) == []


# Item 7: one command per output; a replacement a kill left half done is finished first.


@pytest.mark.parametrize("name", COMMANDS)
def test_a_second_command_on_the_same_output_exits_2_naming_the_holder(name, sources, tmp_path, capsys):
    out = tmp_path / "out"
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO_ROOT)!r})
        from lora.core.locks import hold_output_lock
        with hold_output_lock({str(out)!r}):
            print("held", flush=True)
            time.sleep(120)
    """)
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert run_command(name, sources, out) == 2
        assert f"{out} is being written by process {holder.pid} " in capsys.readouterr().err
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("name", COMMANDS)
def test_a_replacement_a_kill_interrupted_is_completed_before_the_command_looks(name, sources, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_command(name, sources, out) == 0
    capsys.readouterr()
    # The state move_into_place leaves when killed between its two renames: the old output set aside, the complete
    # new build beside it, the journal naming both.
    old, new = tmp_path / ".out.old-1", tmp_path / ".out.build"
    out.rename(old)
    shutil.copytree(old, new)
    (new / "from_the_new_build.txt").write_text("new")
    (tmp_path / ".out.replacing.json").write_text(json.dumps({"new": new.name, "old": old.name, "output": "out"}))
    code = run_command(name, sources, out, overwrite=False)
    captured = capsys.readouterr()
    assert f"completed an interrupted replacement of {out}" in captured.out
    if name == "export":
        assert code == 0  # it replaces its own earlier export, as always
    else:
        assert code == 2 and "already exists" in captured.err  # the completed replacement is kept: no --overwrite
        assert (out / "from_the_new_build.txt").is_file()
    assert hidden_leftovers(tmp_path) == []


def test_a_replacement_journal_that_cannot_be_acted_on_stops_the_command_with_exit_2(sources, tmp_path, capsys):
    out = user_folder(tmp_path / "out")
    (out / MERGE_RECORD).write_text("{}")
    journal = tmp_path / ".out.replacing.json"
    journal.write_text("{not json")
    before = snapshot(out)
    assert merge_main([str(sources["dora"]), "--out", str(out), "--overwrite"]) == 2
    error = capsys.readouterr().err
    assert f"{journal} (an interrupted replacement of {out}) cannot be read" in error and "Traceback" not in error
    assert snapshot(out) == before and journal.read_text() == "{not json"

"""Nothing lost, nothing written outside the output folder: --overwrite builds beside and swaps at the end, only over
a folder the runner wrote; recipe names are plain names; --resume checks checkpoints and keeps a finished record.

Each test runs the real entry point (lora/finetune.py's main, or eval/evaluate.py's) on the tiny local Llama and
checks the exit code, the message and that the previous adapter's files are byte-identical."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO_ROOT
from lora.core.locks import lock_path_for
from lora.finetune import harness_scoring, main
from lora.recipes.outputs import default_output_dir
from lora.recipes.registry import resolve_recipe
from lora.training.checkpoints import checkpoint_problem
from lora.training.run import run_recipe


@pytest.fixture(scope="module")
def registry(tmp_path_factory, tiny_model_dir):
    folder = tmp_path_factory.mktemp("registry")
    recipes = {
        # 2 steps, a checkpoint after each: a finished run keeps checkpoint-1 and checkpoint-2.
        "tiny": {
            "base_model": str(tiny_model_dir),
            "dataset_path": str(REPO_ROOT / "data/train/sentiment_train.jsonl"),
            "quant_bits": None, "max_train_examples": 16, "max_steps": 2, "batch_size": 4, "learning_rate": 0.01,
            "lr_scheduler_type": "constant", "warmup_steps": 0, "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0,
            "logging_steps": 1, "max_seq_length": 64, "save_steps": 1,
        },
    }
    path = folder / "finetune_configs.json"
    path.write_text(json.dumps(recipes, indent=2))
    return path


@pytest.fixture(scope="module")
def finished_run(registry, tmp_path_factory):
    """A finished run folder, trained once per module; tests copy it before touching it."""
    out = tmp_path_factory.mktemp("finished") / "tiny"
    assert main(["tiny", "--registry", str(registry), "--output-dir", str(out)]) == 0
    return out


def _copy_run(finished_run, tmp_path):
    out = tmp_path / "tiny"
    shutil.copytree(finished_run, out)
    return out


def _snapshot(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _siblings(out) -> list[str]:
    lock = lock_path_for(out)  # the one-writer lock stays beside the output (deleting a lock file is not safe)
    return sorted(p.name for p in out.parent.iterdir() if p not in (out, lock))


def _break_weights(copy):
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    return [], [f"cannot load model weights from {copy}: {weights} is damaged",
                "model.safetensors is truncated or corrupt"]


def _break_chat_template(copy):
    (copy / "chat_template.jinja").unlink()  # fails after the model has loaded, when the data is tokenised
    return ["--set", "prompt_template=chat"], ['prompt_template "chat" needs a tokenizer with a chat template']


@pytest.mark.parametrize("break_base", [_break_weights, _break_chat_template], ids=["truncated_base", "no_template"])
def test_overwrite_that_fails_keeps_the_old_adapter(registry, finished_run, tiny_model_dir, tmp_path, capsys,
                                                    break_base):
    out = _copy_run(finished_run, tmp_path)
    before = _snapshot(out)
    base = tmp_path / "base_copy"
    shutil.copytree(tiny_model_dir, base)
    extra, fragments = break_base(base)
    code = main(["tiny", "--registry", str(registry), "--output-dir", str(out), "--overwrite",
                 "--set", f"base_model={base}", *extra])
    assert code == 2
    error = capsys.readouterr().err
    assert all(fragment in error for fragment in fragments), error
    assert _snapshot(out) == before
    assert _siblings(out) == ["base_copy"]  # no replacement folder left behind


def test_overwrite_interrupted_at_the_last_moment_keeps_the_old_adapter(registry, finished_run, tmp_path,
                                                                        monkeypatch):
    import lora.training.model_card

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # stands in for a kill while the new final files are being staged

    out = _copy_run(finished_run, tmp_path)
    before = _snapshot(out)
    monkeypatch.setattr(lora.training.model_card, "write_model_card", crash)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(resolve_recipe("tiny", registry, ["seed=7"]), out, overwrite=True, scoring=harness_scoring())
    assert _snapshot(out) == before and _siblings(out) == []
    monkeypatch.undo()

    # The same overwrite, left to finish: the new adapter replaces the old one, and nothing else is left beside it.
    run_recipe(resolve_recipe("tiny", registry, ["seed=7"]), out, overwrite=True, scoring=harness_scoring())
    assert (out / "adapter_model.safetensors").read_bytes() != before["adapter_model.safetensors"]
    assert json.loads((out / "run_summary.json").read_text())["status"] == "completed"
    assert _siblings(out) == []


def test_overwrite_refuses_a_folder_the_runner_did_not_write(registry, tmp_path, capsys):
    out = tmp_path / "my_files"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "data").mkdir()
    for extra in (["--overwrite"], []):
        code = main(["tiny", "--registry", str(registry), "--output-dir", str(out), *extra])
        assert code == 2
        error = capsys.readouterr().err
        assert f"{out} is not a run folder of lora/finetune.py" in error
        assert "it holds: data/, notes.txt), so it is neither written into nor replaced" in error
    assert _snapshot(out) == {"notes.txt": b"mine"} and (out / "data").is_dir()


@pytest.mark.parametrize("bad_name", ["../../x", "/tmp/abs", ".", "..", "a/b", ".hidden", "trailing.", "a\\b", ""])
def test_recipe_names_must_be_plain_names(tmp_path, capsys, bad_name):
    registry = tmp_path / "finetune_configs.json"
    recipe = {"base_model": "some/model", "dataset_path": "d.jsonl"}
    registry.write_text(json.dumps({"fine.name-1_x": recipe, bad_name: recipe}))
    message = f"registry {registry}: recipe name {json.dumps(bad_name)} is not a plain name"
    named = bad_name or "fine.name-1_x"  # the command line cannot name "" itself; the registry is refused anyway
    for command in (["--list"], ["fine.name-1_x", "--dry-run"], [named, "--overwrite"]):
        assert main([*command, "--registry", str(registry)]) == 2
        assert message in capsys.readouterr().err
    from eval.evaluate import main as evaluate

    assert evaluate(["--recipe", named, "--registry", str(registry)]) == 2
    assert message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["finetune_configs.json"]  # nothing written anywhere


def test_plain_names_with_dots_inside_are_accepted(tmp_path):
    registry = tmp_path / "finetune_configs.json"
    registry.write_text(json.dumps({"smollm2.v1-r8_dora": {"base_model": "some/model", "dataset_path": "d.jsonl"}}))
    assert default_output_dir(resolve_recipe("smollm2.v1-r8_dora", registry)) == (
        tmp_path / "outputs" / "smollm2.v1-r8_dora")


def test_resume_auto_skips_a_truncated_checkpoint_and_keeps_the_record_until_replaced(registry, finished_run,
                                                                                       tmp_path, capsys, monkeypatch):
    import lora.training.model_card

    out = _copy_run(finished_run, tmp_path)
    damaged = out / "checkpoints" / "checkpoint-2" / "adapter_model.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:-100])
    record = (out / "run_summary.json").read_bytes()
    capsys.readouterr()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    # A crash of the resumed run before its replacement is staged leaves the finished record as it was.
    monkeypatch.setattr(lora.training.model_card, "write_model_card", crash)
    with pytest.raises(KeyboardInterrupt):
        main(["tiny", "--registry", str(registry), "--output-dir", str(out), "--resume", "auto"])
    assert (out / "run_summary.json").read_bytes() == record
    monkeypatch.undo()
    printed = capsys.readouterr().out
    assert ("--resume auto: skipping damaged checkpoint-2: adapter_model.safetensors is truncated or corrupt"
            in printed)
    assert "--resume auto: continuing from checkpoint-1 (the newest intact one)" in printed

    damaged.write_bytes(damaged.read_bytes()[:-100])  # the crashed run rewrote checkpoint-2: damage it again
    assert main(["tiny", "--registry", str(registry), "--output-dir", str(out), "--resume", "auto"]) == 0
    assert "continuing from checkpoint-1 (the newest intact one)" in capsys.readouterr().out
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 2
    # Resumed from step 1 with the restored optimizer, scheduler and RNG: the very adapter of the uninterrupted run.
    resumed, original = load_file(out / "adapter_model.safetensors"), load_file(
        finished_run / "adapter_model.safetensors")
    assert resumed.keys() == original.keys()
    assert all(torch.equal(resumed[name], original[name]) for name in original)


def test_resume_auto_into_a_finished_folder_without_checkpoints_is_refused(registry, finished_run, tmp_path, capsys):
    out = _copy_run(finished_run, tmp_path)
    shutil.rmtree(out / "checkpoints")
    before = _snapshot(out)
    code = main(["tiny", "--registry", str(registry), "--output-dir", str(out), "--resume", "auto"])
    assert code == 2
    error = capsys.readouterr().err
    assert (f"{out} holds a finished adapter (2 steps) and no intact checkpoint to resume from, so --resume has "
            "nothing to continue. Pass --overwrite to train again from step 0") in error
    assert _snapshot(out) == before


def test_resume_auto_of_a_finished_run_at_its_last_checkpoint_keeps_the_adapter(registry, finished_run, tmp_path,
                                                                                capsys):
    # The Trainer resumed at its last step trains one step past max_steps; that adapter must not replace this one.
    out = _copy_run(finished_run, tmp_path)
    before = _snapshot(out)
    code = main(["tiny", "--registry", str(registry), "--output-dir", str(out), "--resume", "auto"])
    assert code == 2
    assert (f"recipe tiny: {out} holds a finished adapter and its checkpoint checkpoint-2 is at step 2, where the "
            "recipe stops (max_steps 2): there is nothing left to train") in capsys.readouterr().err
    assert _snapshot(out) == before

    # Asked for more steps, the same resume continues from checkpoint-2 and trains exactly to the new end.
    assert main(["tiny", "--registry", str(registry), "--output-dir", str(out), "--resume", "auto",
                 "--set", "max_steps=3"]) == 0
    assert json.loads((out / "run_summary.json").read_text())["steps"] == 3


def test_resume_path_to_a_damaged_checkpoint_names_the_file(registry, finished_run, tmp_path, capsys):
    out = _copy_run(finished_run, tmp_path)
    checkpoint = out / "checkpoints" / "checkpoint-1"
    optimizer = checkpoint / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[: optimizer.stat().st_size // 2])
    before = _snapshot(out)
    code = main(["tiny", "--registry", str(registry), "--output-dir", str(tmp_path / "new"), "--resume",
                 str(checkpoint)])
    assert code == 2
    assert (f"--resume {checkpoint}: this checkpoint cannot be resumed from: optimizer.pt cannot be read"
            in capsys.readouterr().err)
    assert _snapshot(out) == before and not (tmp_path / "new").exists()


def test_checkpoint_problem_names_missing_and_unreadable_files(finished_run, tmp_path):
    checkpoint = tmp_path / "checkpoint-1"
    shutil.copytree(finished_run / "checkpoints" / "checkpoint-1", checkpoint)
    assert checkpoint_problem(checkpoint) is None
    (checkpoint / "scheduler.pt").unlink()
    (checkpoint / "optimizer.pt").unlink()
    assert checkpoint_problem(checkpoint) == "missing scheduler.pt, optimizer.pt"
    shutil.copy2(finished_run / "checkpoints" / "checkpoint-1" / "scheduler.pt", checkpoint)
    shutil.copy2(finished_run / "checkpoints" / "checkpoint-1" / "optimizer.pt", checkpoint)
    (checkpoint / "trainer_state.json").write_text('{"global_step": 1')
    assert checkpoint_problem(checkpoint).startswith("trainer_state.json cannot be read")


# ---- a full disk, told in the user's words -------------------------------------------------------------------------


def _disk_full_message(error, output_dir, work_dir):
    from lora.training.run_folder import OutputPlan, disk_full_error

    found = disk_full_error(error, OutputPlan(output_dir=output_dir, work_dir=work_dir))
    return None if found is None else str(found)


def test_a_full_disk_names_the_disk_the_space_and_what_is_kept_and_other_errors_are_left_alone(tmp_path):
    import errno
    import re

    from lora.training.run_folder import CHECKPOINT_DIR

    run = tmp_path / "run"
    (run / "checkpoint-2").mkdir(parents=True)
    (run / "checkpoint-2" / "adapter.safetensors").write_bytes(b"x" * 1536)
    (run / "link").symlink_to(run / "checkpoint-2" / "adapter.safetensors")  # counted once, as the file it names
    full = OSError(errno.ENOSPC, "No space left on device")
    message = _disk_full_message(full, run, run)
    mount = tmp_path.resolve()
    while not os.path.ismount(mount):
        mount = mount.parent
    size = r"\d+(\.\d)? (bytes|KiB|MiB|GiB)"
    assert re.fullmatch(
        rf"the disk holding {re.escape(str(run))} \(mounted at {re.escape(str(mount))}\) is full: {size} free of "
        rf"{size}, and this run's folder needs at least 1\.5 KiB \(what it had written when the disk filled; each "
        r"checkpoint adds its adapter and optimizer state\)\. Nothing was published and the checkpoints written so "
        rf"far stay in {re.escape(str(run / CHECKPOINT_DIR))}\. Free space on that disk, or pass --output-dir on "
        r"another one\. \(\[Errno 28\] No space left on device\)", message), message

    # replacing a finished run: the new run writes beside it, and the old one is what the message keeps
    finished, beside = tmp_path / "finished", tmp_path / ".finished.overwrite"
    finished.mkdir()
    (finished / "adapter_model.safetensors").write_bytes(b"x" * (3 << 20))
    beside.mkdir()
    (beside / "partial").write_bytes(b"x" * 1024)
    message = _disk_full_message(OSError(errno.EDQUOT, "Disk quota exceeded"), finished, beside)
    assert "needs at least 3.0 MiB (what the run it replaces takes;" in message
    assert f"the previous run in {finished} is unchanged." in message

    # the cause of a library's own error counts; words alone count only when the disk really is nearly full
    try:
        try:
            raise full
        except OSError as cause:
            raise RuntimeError("safetensors could not save the checkpoint") from cause
    except RuntimeError as wrapped:
        assert _disk_full_message(wrapped, run, run) is not None
    assert _disk_full_message(RuntimeError("PytorchStreamWriter: file write failed"), run, run) is None
    assert _disk_full_message(ValueError("bad value"), run, run) is None
    assert _disk_full_message(OSError(errno.EACCES, "Permission denied"), run, run) is None


def _needing_more_than_the_free_space(run):
    """Make `run` look bigger than the free space of its disk: a sparse file (its apparent size is counted, no block
    is written), so that a library's words alone are believed, as on a nearly full disk."""
    run.mkdir(parents=True, exist_ok=True)
    with open(run / "sparse", "wb") as sparse:
        sparse.truncate(shutil.disk_usage(run).free + (1 << 30))


def test_a_full_disk_is_found_through_every_link_of_the_error_chain_and_by_words_only_when_room_is_short(tmp_path):
    import errno

    run = tmp_path / "run"
    run.mkdir()
    full = OSError(errno.ENOSPC, "No space left on device")
    try:  # raised while handling the full disk: only __context__ links them
        try:
            raise full
        except OSError:
            raise RuntimeError("saving failed")  # noqa: B904 - the implicit link is what is tested
    except RuntimeError as wrapped:
        assert wrapped.__cause__ is None and wrapped.__context__ is full
        assert _disk_full_message(wrapped, run, run) is not None
    explicit = RuntimeError("could not write the checkpoint")
    explicit.__cause__ = full  # `raise ... from full` outside the handler: only __cause__
    assert explicit.__context__ is None and _disk_full_message(explicit, run, run) is not None
    # the errno decides, whatever a library wrote as its text
    assert _disk_full_message(OSError(errno.ENOSPC, "write error"), run, run) is not None

    # words alone: believed once the run needs more than the disk has free, and only the words of a full disk
    _needing_more_than_the_free_space(run)
    for words in ("PytorchStreamWriter failed writing file data/0: file write failed",
                  "[enforce fail at inline_container.cc:603] . unexpected pos 123 vs 456", "StorageFull"):
        assert "is full" in _disk_full_message(RuntimeError(words), run, run), words
    assert _disk_full_message(OSError(errno.EACCES, "Permission denied"), run, run) is None
    assert _disk_full_message(ValueError("bad value"), run, run) is None


def test_a_librarys_words_alone_mean_a_full_disk_only_below_one_mib_free_or_the_runs_need(small_disk):
    """torch says "file write failed" for a full disk and for other write errors: believed when less than
    max(what the run needs, 1 MiB) is free. On a tmpfs, whose free space is exact to the page."""
    disk = small_disk(4 << 20)
    run = disk / "run"
    run.mkdir()  # nothing written yet: the run needs less than the 1 MiB floor
    words = RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")

    def leave_free(count: int) -> None:
        filler = disk / "filler"
        filler.unlink(missing_ok=True)
        filler.write_bytes(b"\0" * (shutil.disk_usage(disk).free - count))
        assert shutil.disk_usage(disk).free == count

    leave_free(1 << 20)  # exactly the floor: room enough, so some other write error
    assert _disk_full_message(words, run, run) is None
    leave_free((1 << 20) - 4096)  # a page less
    assert "is full" in _disk_full_message(words, run, run)
    leave_free(3 << 19)  # 1.5 MiB
    assert _disk_full_message(words, run, run) is None


def test_a_full_disk_message_names_the_right_disk_and_need_before_and_after_anything_was_written(tmp_path):
    import errno

    full = OSError(errno.ENOSPC, "No space left on device")
    # the run's folder not made yet: the disk of the folder it would be made in; nothing written
    message = _disk_full_message(full, tmp_path / "new", tmp_path / "new")
    assert "needs at least 0 bytes (what it had written when the disk filled;" in message
    # a first run never speaks of a run it replaces, whatever it wrote
    (tmp_path / "first").mkdir()
    assert "what it had written" in _disk_full_message(full, tmp_path / "first", tmp_path / "first")
    # a replacement that wrote as much as the run it replaces: it needs that much
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "adapter").write_bytes(b"x" * 2048)
    (tmp_path / ".old.overwrite").mkdir()
    (tmp_path / ".old.overwrite" / "adapter").write_bytes(b"x" * 2048)
    message = _disk_full_message(full, tmp_path / "old", tmp_path / ".old.overwrite")
    assert "needs at least 2.0 KiB (what the run it replaces takes;" in message
    # a folder that is itself a mount point (an --output-dir on its own disk) is on that disk, not its parent's
    mount_point = next((path for path in ("/dev/shm", "/run", "/dev") if os.path.ismount(path)), None)
    if mount_point is None:
        pytest.skip("no mount point to use as a run folder here: runs where /dev/shm, /run or /dev is one (Linux)")
    assert f"(mounted at {mount_point})" in _disk_full_message(full, Path(mount_point), Path(mount_point))


def test_a_failed_run_leaves_its_checkpoints_but_not_its_half_staged_final_files_or_replacement(tmp_path):
    from lora.training.run_folder import CHECKPOINT_DIR, STAGING_PREFIX, OutputPlan, abandon_output_dir

    # in place (a first run, or resuming): the checkpoints stay for --resume, final files being staged go
    run = tmp_path / "run"
    (run / CHECKPOINT_DIR / "checkpoint-2").mkdir(parents=True)
    (run / f"{STAGING_PREFIX}123").mkdir()
    (run / f"{STAGING_PREFIX}123" / "adapter_model.safetensors").write_bytes(b"half")
    abandon_output_dir(OutputPlan(output_dir=run, work_dir=run))
    assert sorted(p.name for p in run.iterdir()) == [CHECKPOINT_DIR]
    assert (run / CHECKPOINT_DIR / "checkpoint-2").is_dir()
    # replacing a finished run: the replacement goes, the finished run stays as it was
    finished, beside = tmp_path / "finished", tmp_path / ".finished.overwrite"
    finished.mkdir()
    (finished / "adapter_config.json").write_text("{}")
    (beside / f"{STAGING_PREFIX}9").mkdir(parents=True)
    abandon_output_dir(OutputPlan(output_dir=finished, work_dir=beside))
    assert not beside.exists() and [p.name for p in finished.iterdir()] == ["adapter_config.json"]
    # nothing made yet: nothing to do, and no error
    abandon_output_dir(OutputPlan(output_dir=tmp_path / "never", work_dir=tmp_path / "never"))
    assert not (tmp_path / "never").exists()


def test_publishing_renames_every_file_into_the_folder_and_the_adapter_config_last(tmp_path, monkeypatch):
    """A folder with adapter_config.json is a finished adapter to peft and to --resume: it must appear last, after
    every other file, whatever the names sort as; staged files get the mode of a new file (0644 under umask 022),
    not safetensors' 0600; the staging folder goes."""
    import stat

    from lora.core.files import new_file_mode
    from lora.training.run_folder import publish_folder

    staging, out = tmp_path / ".staging-1", tmp_path / "run"
    (staging / "sub" / "deeper").mkdir(parents=True)
    out.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors", "README.md", "sub/deeper/zz.json"):
        (staging / name).write_text(name)
        (staging / name).chmod(0o600)  # as safetensors writes its files
    renamed = []
    real_replace = os.replace

    def watched_replace(source, target):
        renamed.append(Path(target).relative_to(out).as_posix())
        return real_replace(source, target)

    monkeypatch.setattr(os, "replace", watched_replace)
    publish_folder(staging, out)
    assert renamed[-1] == "adapter_config.json"
    assert sorted(renamed) == ["README.md", "adapter_config.json", "adapter_model.safetensors", "sub/deeper/zz.json"]
    assert all((out / name).read_text() == name for name in renamed) and not staging.exists()
    assert all(stat.S_IMODE((out / name).stat().st_mode) == new_file_mode() for name in renamed)  # 0644 by umask


@pytest.mark.parametrize("in_the_way", ["folder", "file", "symlink", "dangling symlink"])
def test_a_replacement_folder_name_taken_by_something_else_is_refused_and_left_alone(tmp_path, in_the_way):
    """`.NAME.overwrite` holding what this tool did not write (settling removes only its own leftovers): --overwrite
    refuses to build there and touches nothing."""
    from lora.core.errors import OutputError
    from lora.training.run_folder import OutputPlan, prepare_output_dir, replacement_dir, settle_output_dir

    out = tmp_path / "run"
    out.mkdir()
    beside = replacement_dir(out)
    if in_the_way == "folder":
        beside.mkdir()
        (beside / "notes.txt").write_text("mine")
    elif in_the_way == "file":
        beside.write_text("mine")
    else:
        (tmp_path / "elsewhere").mkdir()
        beside.symlink_to(tmp_path / ("elsewhere" if in_the_way == "symlink" else "gone"))
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    assert settle_output_dir(out) == []
    with pytest.raises(OutputError) as refused:
        prepare_output_dir(OutputPlan(output_dir=out, work_dir=beside))
    assert str(refused.value) == (f"{beside} is in the way of replacing {out} and was not written by this tool; "
                                  "move it away.")
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_planning_a_run_refuses_overwrite_with_resume_and_a_resume_with_nothing_to_continue(finished_run, tmp_path):
    from lora.core.errors import OutputError
    from lora.training.run_folder import plan_output_dir, replacement_dir

    out = _copy_run(finished_run, tmp_path)
    with pytest.raises(OutputError) as refused:
        plan_output_dir(out, overwrite=True, resume=True)
    assert str(refused.value) == ("--overwrite trains again from step 0 and --resume continues a run: pass only one "
                                  "of them.")
    # a finished run: continuing it needs a checkpoint the caller found; by default none was
    summary = json.loads((out / "run_summary.json").read_text())
    for steps in (summary["steps"], "?"):  # "?": a summary that does not say
        with pytest.raises(OutputError) as refused:
            plan_output_dir(out, overwrite=False, resume=True)
        assert str(refused.value) == (
            f"{out} holds a finished adapter ({steps} steps) and no intact checkpoint to resume from, so --resume has "
            "nothing to continue. Pass --overwrite to train again from step 0 (the finished adapter is replaced only "
            "when the new run has finished), or --output-dir DIR to write elsewhere.")
        summary.pop("steps", None)
        (out / "run_summary.json").write_text(json.dumps(summary))
    plan = plan_output_dir(out, overwrite=False, resume=True, has_checkpoint_to_resume=True)
    assert (plan.work_dir, plan.continues_finished) == (replacement_dir(out), True)


@pytest.mark.parametrize(("count", "listed", "more"), [(8, 8, ""), (9, 8, " and 1 more"), (11, 8, " and 3 more")])
def test_a_folder_the_runner_did_not_write_is_refused_listing_what_it_holds(tmp_path, count, listed, more):
    from lora.core.errors import OutputError
    from lora.training.run_folder import plan_output_dir

    out = tmp_path / "mine"
    out.mkdir()
    names = [f"file{i:02d}.txt" for i in range(count - 1)] + ["photos"]
    for name in names[:-1]:
        (out / name).write_text("x")
    (out / "photos").mkdir()
    shown = [name + ("/" if name == "photos" else "") for name in sorted(names)][:listed]
    with pytest.raises(OutputError) as refused:
        plan_output_dir(out, overwrite=True, resume=False)
    assert str(refused.value) == (
        f"{out} is not a run folder of lora/finetune.py (it has no run_summary.json written by it; it holds: "
        f"{', '.join(shown)}{more}), so it is neither written into nor replaced. Choose another --output-dir, or "
        "empty that folder yourself.")
    (tmp_path / "a file").write_text("x")
    with pytest.raises(OutputError) as refused:
        plan_output_dir(tmp_path / "a file", overwrite=False, resume=False)
    assert str(refused.value) == f"the output folder {tmp_path / 'a file'} is a file; choose another --output-dir."


def test_a_finished_or_interrupted_run_is_not_trained_over_without_being_asked(finished_run, tmp_path):
    from lora.core.errors import OutputError
    from lora.training.run_folder import plan_output_dir

    out = _copy_run(finished_run, tmp_path)
    with pytest.raises(OutputError) as refused:
        plan_output_dir(out, overwrite=False, resume=False)
    assert str(refused.value) == (f"{out} already holds a finished adapter. Pass --overwrite to replace it (only "
                                  "once the new run has finished), or --output-dir DIR to write elsewhere.")
    (out / "adapter_config.json").unlink()  # as a run killed before publishing leaves it, with its checkpoints
    with pytest.raises(OutputError) as refused:
        plan_output_dir(out, overwrite=False, resume=False)
    assert str(refused.value) == (f"{out} holds checkpoints of an interrupted run. Pass --resume auto to continue "
                                  "it, or --overwrite to start again.")


def test_continuing_a_finished_run_shares_its_checkpoints_and_copies_its_logs(tmp_path):
    """The replacement a resumed finished run is built in starts with the finished run's checkpoints as hard links
    (never changed once written), its tracker logs as copies (appended to), symlinks as symlinks, and without a
    checkpoint still being written; final files a killed run was staging there are removed."""
    from lora.training.checkpoints import CHECKPOINT_STAGING_DIR
    from lora.training.run_folder import CHECKPOINT_DIR, STAGING_PREFIX, OutputPlan, prepare_output_dir, replacement_dir

    out = tmp_path / "run"
    (out / CHECKPOINT_DIR / "checkpoint-2").mkdir(parents=True)
    (out / CHECKPOINT_DIR / "checkpoint-2" / "adapter_model.safetensors").write_bytes(b"weights")
    (out / CHECKPOINT_DIR / "latest").symlink_to("checkpoint-2")
    (out / CHECKPOINT_DIR / CHECKPOINT_STAGING_DIR).mkdir()
    (out / "logs").mkdir()
    (out / "logs" / "events.log").write_text("step 2\n")
    plan = OutputPlan(output_dir=out, work_dir=replacement_dir(out), continues_finished=True)
    prepare_output_dir(plan)
    work = plan.work_dir
    weights = CHECKPOINT_DIR + "/checkpoint-2/adapter_model.safetensors"
    assert (work / weights).stat().st_ino == (out / weights).stat().st_ino
    assert (work / "logs" / "events.log").read_text() == "step 2\n"
    assert (work / "logs" / "events.log").stat().st_ino != (out / "logs" / "events.log").stat().st_ino
    assert (work / CHECKPOINT_DIR / "latest").is_symlink()
    assert os.readlink(work / CHECKPOINT_DIR / "latest") == "checkpoint-2"
    assert not (work / CHECKPOINT_DIR / CHECKPOINT_STAGING_DIR).exists()
    # in place (resuming an interrupted run): staged final files of a killed run go, its checkpoints stay
    (out / f"{STAGING_PREFIX}5").mkdir()
    prepare_output_dir(OutputPlan(output_dir=out, work_dir=out))
    assert not (out / f"{STAGING_PREFIX}5").exists() and (out / weights).exists()


def test_a_run_folder_is_made_with_every_missing_parent(tmp_path):
    from lora.training.run_folder import OutputPlan, prepare_output_dir

    out = tmp_path / "new" / "nested" / "run"
    prepare_output_dir(OutputPlan(output_dir=out, work_dir=out))
    assert out.is_dir() and list(out.iterdir()) == []


def test_an_action_on_the_main_process_hands_back_its_result_its_refusal_or_its_bug():
    """One process (accelerate's real PartialState): the action's result is returned; a UserError comes back as an
    OutputError with its words; any other exception is raised as it was (a bug shows its own traceback)."""
    from accelerate import PartialState

    from lora.core.errors import OutputError, UserError
    from lora.training.run_folder import on_main_process

    state = PartialState()
    assert state.num_processes == 1 and on_main_process(state, lambda: ["settled"]) == ["settled"]

    def refuse():
        raise UserError("the folder is held by process 7")

    with pytest.raises(OutputError) as refused:
        on_main_process(state, refuse)
    assert str(refused.value) == "the folder is held by process 7"
    bug = KeyError("steps")

    def fail():
        raise bug

    with pytest.raises(KeyError) as raised:
        on_main_process(state, fail)
    assert raised.value is bug


def test_settling_removes_only_an_unfinished_replacement_this_tool_left_and_says_so(tmp_path):
    from lora.training.run_folder import replacement_dir, settle_output_dir

    out = tmp_path / "run"
    out.mkdir()
    assert settle_output_dir(out) == []  # nothing beside it: nothing to say
    replacement_dir(out).mkdir()  # what a run killed before writing anything leaves
    assert settle_output_dir(out) == [f"removed {replacement_dir(out)}, the unfinished replacement of a run that "
                                      "was stopped (it was never published)"]
    assert not replacement_dir(out).exists()


def test_sizes_are_told_in_the_largest_unit_below_1024():
    from lora.training.run_folder import human_size

    assert [human_size(n) for n in (0, 1023, 1024, 1536, (3 << 20) - 1, 5 << 30, 2 << 40)] == [
        "0 bytes", "1023 bytes", "1.0 KiB", "1.5 KiB", "3.0 MiB", "5.0 GiB", "2048.0 GiB"]


def test_checkpoints_carried_into_a_replacement_are_linked_or_copied_across_file_systems(tmp_path):
    import tempfile

    from lora.training.run_folder import link_or_copy

    source = tmp_path / "optimizer.pt"
    source.write_bytes(b"state")
    os.utime(source, (1_000_000, 1_000_000))
    link_or_copy(str(source), str(tmp_path / "linked.pt"))
    assert os.path.samefile(source, tmp_path / "linked.pt")  # one file system: a hard link, no second copy
    if not os.path.isdir("/dev/shm") or os.stat("/dev/shm").st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on another file system than the temporary folder (a hard link cannot cross)")
    with tempfile.TemporaryDirectory(dir="/dev/shm") as other:
        copied = os.path.join(other, "optimizer.pt")
        link_or_copy(str(source), copied)
        assert open(copied, "rb").read() == b"state" and not os.path.samefile(source, copied)
        assert os.stat(copied).st_mtime == 1_000_000  # copied with its times, as copytree's default would

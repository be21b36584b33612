"""The run folder after a kill, beside another run, on a full disk, and when resumed at or past its end.

Kills are real SIGKILLs at a known point: a test-only launcher runs lora/finetune.py as `python lora/finetune.py`
would, after wrapping one function so that the process kills itself right after a checkpoint is published or right
before the k-th rename of the final publish. Each test then runs the real entry point again and checks the exit
code, what it says, and the files left.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO_ROOT
from lora.core.locks import hold_output_lock, lock_path_for
from lora.finetune import main
from lora.training.checkpoints import (
    CHECKPOINT_REQUIRED_FILES,
    TRAINER_STATE_FILE,
    checkpoint_problem,
    find_resume_point,
)
from lora.training.run_folder import CHECKPOINT_DIR, replacement_dir

ADAPTER = "adapter_model.safetensors"

KILLER = '''
import os, runpy, signal, sys
from pathlib import Path
sys.path.insert(0, {repo!r})
import lora.training.model_card
import lora.training.sft


def die():
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


at_checkpoint = os.environ.get("KILL_AFTER_CHECKPOINT")
if at_checkpoint:
    publish = lora.training.sft.publish_checkpoint

    def publish_then_die(staging, final):
        publish(staging, final)
        if Path(final).name == "checkpoint-" + at_checkpoint:
            die()

    lora.training.sft.publish_checkpoint = publish_then_die

# Counting starts once the final files are staged (the model card is the last one): from there on, the renames are
# the publish of the run.
calls = {{"armed": False, "rename": 0, "replace": 0}}
for name in ("rename", "replace"):
    limit = os.environ.get("KILL_BEFORE_" + name.upper())
    if limit:
        def counted(*args, _real=getattr(os, name), _name=name, _limit=int(limit), **kwargs):
            if calls["armed"]:
                calls[_name] += 1
                if calls[_name] == _limit:
                    die()
            return _real(*args, **kwargs)

        setattr(os, name, counted)
write_card = lora.training.model_card.write_model_card


def write_card_then_arm(*args, **kwargs):
    write_card(*args, **kwargs)
    calls["armed"] = True


lora.training.model_card.write_model_card = write_card_then_arm
sys.argv = [str(Path({repo!r}) / "lora/finetune.py")] + sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
'''


@pytest.fixture(scope="module")
def registry(tmp_path_factory, tiny_model_dir):
    folder = tmp_path_factory.mktemp("registry")
    common = {
        "base_model": str(tiny_model_dir), "dataset_path": str(REPO_ROOT / "data/train/sentiment_train.jsonl"),
        "quant_bits": None, "max_train_examples": 16, "batch_size": 4, "learning_rate": 0.01,
        "lr_scheduler_type": "constant", "warmup_steps": 0, "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0,
        "max_seq_length": 64,
    }
    recipes = {
        # 2 steps, a checkpoint and a logged loss after each.
        "tiny": {**common, "max_steps": 2, "save_steps": 1, "logging_steps": 1},
        # The default logging_steps (10): only step 1 logs a loss (logging_first_step).
        "quiet": {**common, "max_steps": 3, "save_steps": 1},
        "six": {**common, "max_steps": 6, "save_steps": 2, "save_total_limit": 3},
    }
    path = folder / "finetune_configs.json"
    path.write_text(json.dumps(recipes, indent=2))
    return path


def _args(registry, recipe: str, out: Path, *extra: str) -> list[str]:
    return [recipe, "--registry", str(registry), "--output-dir", str(out), *extra]


@pytest.fixture(scope="module")
def finished_run(registry, tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "tiny"
    assert main(_args(registry, "tiny", out)) == 0
    return out


def _copy_run(finished_run, tmp_path) -> Path:
    out = tmp_path / "tiny"
    shutil.copytree(finished_run, out)
    return out


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _siblings(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p not in (out, lock_path_for(out)))


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _run_killed(tmp_path, args: list[str], **kill_at: int) -> subprocess.CompletedProcess:
    """Run lora/finetune.py ARGS in a process that SIGKILLs itself at the point `kill_at` names, and check it did."""
    killer = tmp_path / "killer.py"
    killer.write_text(KILLER.format(repo=str(REPO_ROOT)))
    env = {**_env(), **{key.upper(): str(value) for key, value in kill_at.items()}}
    result = subprocess.run([sys.executable, str(killer), *args], capture_output=True, text=True, env=env,
                            timeout=600)
    assert result.returncode == -signal.SIGKILL, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def _is_consistent_finished_run(out: Path) -> int:
    """The steps of a finished run whose adapter, trainer state, recipe and record all belong to one run."""
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["status"] == "completed"
    state = json.loads((out / TRAINER_STATE_FILE).read_text())
    recipe = json.loads((out / "recipe.json").read_text())
    assert summary["steps"] == state["global_step"] == recipe["max_steps"]
    assert (out / "adapter_config.json").is_file() and load_file(out / ADAPTER)
    return summary["steps"]


# --- item 3: an --overwrite killed between the two renames of its swap ---------------------------------------

@pytest.mark.slow
def test_an_overwrite_killed_between_its_swap_renames_is_completed_by_the_next_run(registry, finished_run, tmp_path,
                                                                                  capsys):
    out = _copy_run(finished_run, tmp_path)
    old = _snapshot(out)
    _run_killed(tmp_path, _args(registry, "tiny", out, "--overwrite", "--set", "seed=7"), kill_before_rename=2)
    assert not out.exists()  # the old run is aside, the new one not yet in place

    # The next run, of any kind, finds the swap and completes it before it looks at the folder: here a plain run,
    # which then refuses (the folder holds a finished adapter) instead of training a fresh folder without a word.
    assert main(_args(registry, "tiny", out)) == 2
    captured = capsys.readouterr()
    assert (f"completed an interrupted replacement of {out}: the new output is in place, the previous one removed"
            in captured.out)
    assert f"{out} already holds a finished adapter" in captured.err
    assert _is_consistent_finished_run(out) == 2
    assert _snapshot(out)[ADAPTER] != old[ADAPTER]  # the seed-7 run, complete
    assert json.loads((out / "recipe.json").read_text())["seed"] == 7
    assert _siblings(out) == ["killer.py"]


@pytest.mark.slow
def test_a_killed_overwrite_leaves_a_replacement_that_is_removed_and_never_published(registry, finished_run,
                                                                                   tmp_path, capsys):
    out = _copy_run(finished_run, tmp_path)
    old = _snapshot(out)
    _run_killed(tmp_path, _args(registry, "tiny", out, "--overwrite", "--set", "seed=7"), kill_after_checkpoint=1)
    stale = replacement_dir(out)
    assert (stale / CHECKPOINT_DIR / "checkpoint-1").is_dir() and _snapshot(out) == old
    (stale / "left_by_the_killed_run.txt").write_text("must never be published")
    (stale / CHECKPOINT_DIR / "checkpoint-99").mkdir()

    assert main(_args(registry, "tiny", out, "--overwrite")) == 0
    assert f"removed {stale}, the unfinished replacement of a run that was stopped" in capsys.readouterr().out
    assert not (out / "left_by_the_killed_run.txt").exists()
    assert sorted(p.name for p in (out / CHECKPOINT_DIR).iterdir()) == ["checkpoint-1", "checkpoint-2"]
    assert json.loads((out / "recipe.json").read_text())["seed"] != 7
    assert _siblings(out) == ["killer.py"]


# --- item 4: --resume of a finished run, killed while it publishes ----------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("kill_at, expected", [
    ({"kill_before_replace": 1}, "old"),  # the record's "running" write
    ({"kill_before_replace": 4}, "old"),  # among the final files
    ({"kill_before_rename": 1}, "new"),   # the swap: old folder aside
    ({"kill_before_rename": 2}, "new"),   # the swap: new folder into place
], ids=["record", "final_files", "swap_1", "swap_2"])
def test_resume_of_a_finished_run_killed_while_publishing_leaves_the_old_or_the_new_run(registry, finished_run,
                                                                                       tmp_path, capsys, kill_at,
                                                                                       expected):
    out = _copy_run(finished_run, tmp_path)
    old = _snapshot(out)
    _run_killed(tmp_path, _args(registry, "tiny", out, "--resume", "auto", "--set", "max_steps=3"), **kill_at)
    assert main(_args(registry, "tiny", out)) == 2  # settles the folder, then refuses: it holds a finished adapter
    assert "already holds a finished adapter" in capsys.readouterr().err
    if expected == "old":
        assert _snapshot(out) == old
    else:
        assert _is_consistent_finished_run(out) == 3
        assert (out / CHECKPOINT_DIR / "checkpoint-3").is_dir()
    assert _siblings(out) == ["killer.py"]


# --- item 5: a resumed run whose own steps log no loss -----------------------------------------------------------

def test_train_it_further_with_the_default_logging_steps(registry, tmp_path, capsys):
    out = tmp_path / "quiet"
    assert main(_args(registry, "quiet", out)) == 0
    first = json.loads((out / "run_summary.json").read_text())
    assert main(_args(registry, "quiet", out, "--resume", "auto", "--set", "max_steps=5")) == 0
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["steps"] == 5 and summary["status"] == "completed"
    # The record covers the whole run: step 1's loss, logged before the resume point, is its first and last one.
    assert summary["first_loss"] == summary["final_loss"] == first["first_loss"]
    assert f"- steps: 5, loss {first['first_loss']:.4f} -> {first['first_loss']:.4f}" in (out / "README.md").read_text()
    assert not list(out.glob(".staging-*")) and _siblings(out) == []


@pytest.mark.slow
def test_resume_after_a_kill_at_checkpoint_4_finishes_and_can_resume_again(registry, tmp_path):
    out = tmp_path / "six"
    _run_killed(tmp_path, _args(registry, "six", out), kill_after_checkpoint=4)
    assert main(_args(registry, "six", out, "--resume", "auto")) == 0
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["steps"] == 6 and summary["first_loss"] is not None
    losses = [(entry["step"], entry["loss"]) for entry in json.loads((out / TRAINER_STATE_FILE).read_text())[
        "log_history"] if "loss" in entry]
    assert losses and summary["first_loss"] == losses[0][1]
    assert not list(out.glob(".staging-*"))
    # and once more, further
    assert main(_args(registry, "six", out, "--resume", "auto", "--set", "max_steps=8")) == 0
    assert json.loads((out / "run_summary.json").read_text())["steps"] == 8
    assert not list(out.glob(".staging-*")) and _siblings(out) == ["killer.py"]


# --- item 6: an unfinished folder whose checkpoint is already at max_steps ----------------------------------------

@pytest.mark.slow
def test_resume_from_a_checkpoint_at_max_steps_finishes_without_training(registry, finished_run, tmp_path, capsys):
    out = tmp_path / "tiny"
    _run_killed(tmp_path, _args(registry, "tiny", out), kill_after_checkpoint=2)
    assert json.loads((out / "run_summary.json").read_text())["status"] == "running"
    assert main(_args(registry, "tiny", out, "--resume", "auto")) == 0
    assert ("checkpoint-2 is at step 2, where the recipe stops (max_steps 2): finishing the run from it without "
            "training") in capsys.readouterr().out
    assert _is_consistent_finished_run(out) == 2
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["final_loss"] == json.loads((finished_run / "run_summary.json").read_text())["final_loss"]
    # the adapter of step 2, as the uninterrupted run published it (no step 3 trained)
    published, checkpoint = load_file(out / ADAPTER), load_file(out / CHECKPOINT_DIR / "checkpoint-2" / ADAPTER)
    uninterrupted = load_file(finished_run / ADAPTER)
    assert published.keys() == uninterrupted.keys() == checkpoint.keys()
    assert all(torch.equal(published[k], uninterrupted[k]) and torch.equal(published[k], checkpoint[k])
               for k in published)


# --- item 7: one run per output folder ------------------------------------------------------------------------------

def _hold_with_a_run(args: list[str], out: Path) -> subprocess.Popen:
    """Start a real run and stop it (SIGSTOP) once it holds the output's lock (its owner file names its pid)."""
    process = subprocess.Popen([sys.executable, str(REPO_ROOT / "lora/finetune.py"), *args],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env())
    owner = lock_path_for(out).with_name(lock_path_for(out).name + ".owner")
    deadline = time.monotonic() + 300
    while not (owner.is_file() and f"process {process.pid} " in owner.read_text()):
        if process.poll() is not None:
            pytest.fail(f"the first run ended before it held the output:\n{process.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("the first run never took the output's lock")
        time.sleep(0.02)
    assert process.poll() is None
    process.send_signal(signal.SIGSTOP)  # holds the lock for as long as the test needs
    return process


@pytest.mark.slow
@pytest.mark.parametrize("first", ["plain_into_a_new_folder", "overwrite_of_a_finished_run"])
def test_a_second_run_into_a_held_output_exits_2_naming_the_first(registry, finished_run, tmp_path, capsys, first):
    if first == "plain_into_a_new_folder":
        out, first_args = tmp_path / "new", []
    else:
        out, first_args = _copy_run(finished_run, tmp_path), ["--overwrite"]
    before = _snapshot(out) if out.exists() else {}
    holder = _hold_with_a_run(_args(registry, "tiny", out, *first_args), out)
    try:
        for second in ([], ["--overwrite"], ["--resume", "auto"]):
            assert main(_args(registry, "tiny", out, *second)) == 2, second
            error = capsys.readouterr().err
            assert f"{out} is being written by process {holder.pid} (finetune.py tiny" in error, error
            assert (_snapshot(out) if out.exists() else {}) == before
    finally:
        holder.kill()
        holder.wait()
        holder.stderr.close()
    # a killed holder leaves no stuck lock: the next run goes on (and finishes or settles what it left)
    assert main(_args(registry, "tiny", out, "--overwrite")) == 0
    assert _is_consistent_finished_run(out) == 2 and _siblings(out) == []


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_a_refused_two_process_launch_stops_every_process(registry, tmp_path):
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    out = tmp_path / "out"
    env = {**_env(), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [accelerate, "launch", "--config_file", str(REPO_ROOT / "accelerate_configs/cpu_2proc.yaml"),
               "--main_process_port", str(_free_port()), str(REPO_ROOT / "lora/finetune.py"),
               *_args(registry, "tiny", out)]
    with hold_output_lock(out):
        # Only the main process takes the lock; the other one must stop too, not wait at the next collective
        # (the timeout turns a hang into a failure).
        result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert result.returncode != 0
    # each process stops on the refusal it was handed (not on a broken connection to the other)
    assert result.stderr.count(f"{out} is being written by process {os.getpid()}") == 2, result.stderr[-3000:]
    assert "OutputError" not in result.stderr, result.stderr[-3000:]  # said as a message, not a traceback
    assert not out.exists()


# --- item 10: a checkpoint of another adapter; a full disk -------------------------------------------------------

def test_resume_from_a_checkpoint_of_another_rank_names_the_fields(registry, finished_run, tmp_path, capsys):
    checkpoint = finished_run / CHECKPOINT_DIR / "checkpoint-1"
    before = _snapshot(finished_run)
    code = main(_args(registry, "tiny", tmp_path / "new", "--resume", str(checkpoint), "--set", "lora_r=8",
                      "--set", "lora_alpha=16"))
    assert code == 2
    error = capsys.readouterr().err
    assert (f'checkpoint {checkpoint} holds another adapter than the recipe attaches: "lora_r" is 8 but the '
            'checkpoint has r=4; "lora_alpha" is 16 but the checkpoint has lora_alpha=8. Resume with the checkpoint\'s '
            "settings (--set lora_r=4 --set lora_alpha=8), or start again with --overwrite.") in error
    assert "Traceback" not in error and not (tmp_path / "new").exists()
    assert _snapshot(finished_run) == before


def test_a_full_disk_is_exit_2_naming_the_disk_and_keeps_the_old_adapter(registry, finished_run, small_disk, capsys):
    size = sum(p.stat().st_size for p in finished_run.rglob("*") if p.is_file())
    # room for the finished run and half of another: the --overwrite build fills the disk partway
    disk = small_disk(int(size * 1.5) + 256 * 1024)
    out = disk / "tiny"
    shutil.copytree(finished_run, out)
    before = _snapshot(out)
    assert main(_args(registry, "tiny", out, "--overwrite", "--set", "seed=7")) == 2
    error = capsys.readouterr().err
    assert f"error: the disk holding {replacement_dir(out)} (mounted at {disk}) is full: " in error, error
    assert "this run's folder needs at least " in error
    assert f"Nothing was published and the previous run in {out} is unchanged" in error
    assert "Traceback" not in error
    assert _snapshot(out) == before and _siblings(out) == []


# --- issue 31 item 4: what a checkpoint is, one rule for its writer and its checker --------------------------------

def test_the_checkpoint_writer_and_checker_agree_on_a_real_checkpoint(registry, finished_run, tmp_path):
    for step in (1, 2):
        written = finished_run / CHECKPOINT_DIR / f"checkpoint-{step}"
        names = {p.name for p in written.iterdir()}
        assert set(CHECKPOINT_REQUIRED_FILES) <= names, names  # the checker asks only for what the writer writes
        assert checkpoint_problem(written) is None
    # and each file it requires is one resuming cannot do without: missing, the checkpoint is refused by name
    for name in (*CHECKPOINT_REQUIRED_FILES, "optimizer.pt"):
        copy = tmp_path / name / "checkpoint-1"
        shutil.copytree(finished_run / CHECKPOINT_DIR / "checkpoint-1", copy)
        (copy / name).unlink()
        assert checkpoint_problem(copy) == f"missing {name}"
    # the resume rules read the same checkpoint: --resume auto of the finished run continues from checkpoint-2
    from lora.recipes.registry import resolve_recipe

    point = find_resume_point(resolve_recipe("tiny", registry, ["max_steps=3"]), "auto",
                              finished_run / CHECKPOINT_DIR, finished=True)
    assert point.checkpoint == finished_run / CHECKPOINT_DIR / "checkpoint-2" and not point.nothing_left

"""Crash and resume: a training process killed with SIGKILL resumes from its latest complete checkpoint and ends
with the same adapter as an uninterrupted run; a non-finite loss stops the run and keeps only good checkpoints."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO_ROOT
from lora.finetune import harness_scoring, main
from lora.recipes.registry import resolve_recipe
from lora.training.checkpoints import (
    CHECKPOINT_STAGING_DIR,
    TRAINER_STATE_FILE,
    checkpoint_step,
    is_complete_checkpoint,
    latest_complete_checkpoint,
    publish_checkpoint,
)
from lora.training.run import run_recipe
from lora.training.run_folder import CHECKPOINT_DIR

ADAPTER_FILE = "adapter_model.safetensors"


@pytest.fixture(scope="module")
def registry(tmp_path_factory, tiny_model_dir):
    folder = tmp_path_factory.mktemp("registry")
    recipes = {
        # 48 rows / batch 4 = 12 steps per epoch: 16 steps cross an epoch boundary. Dropout, warm-up and a cosine
        # schedule are on so that a resume has to restore the RNG, scheduler and optimizer states, not just weights.
        "tiny_resume": {
            "base_model": str(tiny_model_dir),
            "dataset_path": str(REPO_ROOT / "data/train/sentiment_train.jsonl"),
            "quant_bits": None, "max_train_examples": 48, "max_steps": 16, "batch_size": 4,
            "learning_rate": 0.01, "lr_scheduler_type": "cosine", "warmup_steps": 2, "lora_r": 4, "lora_alpha": 8,
            "lora_dropout": 0.1, "logging_steps": 1, "max_seq_length": 96, "save_steps": 3, "save_total_limit": 2,
        },
        # An fp16 base (the classic source of NaN losses: activations overflow 65504) with a learning rate that
        # makes the adapter overflow after a few steps. Logging every 4 steps: a guard that only looked at the
        # logged (averaged) loss would miss the step and checkpoint NaN weights.
        "tiny_fp16_overflow": {
            "base_model": str(tiny_model_dir),
            "dataset_path": str(REPO_ROOT / "data/train/sentiment_train.jsonl"),
            "quant_bits": None, "dtype": "float16", "max_train_examples": 48, "max_steps": 30, "batch_size": 4,
            "learning_rate": 0.1, "lr_scheduler_type": "constant", "warmup_steps": 0, "lora_r": 4,
            "lora_alpha": 8, "lora_dropout": 0.0, "logging_steps": 4, "max_seq_length": 96, "save_steps": 2,
            "save_total_limit": 3,
        },
    }
    path = folder / "finetune_configs.json"
    path.write_text(json.dumps(recipes, indent=2))
    return path


def _checkpoint_steps(output_dir) -> list[int]:
    folder = output_dir / CHECKPOINT_DIR
    return sorted(checkpoint_step(p) for p in folder.glob("checkpoint-*")) if folder.is_dir() else []


KILL_AT_STEP = 3  # the first checkpoint (save_steps 3): the kill lands after it is complete, before step 4 runs

# A test-only launcher: lora/finetune.py exactly as the command runs it, plus one callback that SIGKILLs the process
# from inside at a known moment (the start of step KILL_AT_STEP + 1) after saying so. A kill from outside at
# "some point after the first checkpoint appeared" could land after the run had finished, or at any later step.
KILLER = """
import os, runpy, signal, sys
from pathlib import Path
sys.path.insert(0, {repo!r})
from transformers import TrainerCallback
import lora.training.sft

class KillAtAKnownStep(TrainerCallback):
    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == {step}:
            print("killing myself at the start of step {step} + 1", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

build_trainer = lora.training.sft.build_trainer

def build_trainer_with_killer(*args, **kwargs):
    trainer, history = build_trainer(*args, **kwargs)
    trainer.add_callback(KillAtAKnownStep())
    return trainer, history

lora.training.sft.build_trainer = build_trainer_with_killer
sys.argv = [str(Path({repo!r}) / "lora/finetune.py")] + sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _train_until_killed(registry, output_dir, timeout_s: float = 600) -> subprocess.CompletedProcess:
    killer = output_dir.parent / "killer.py"
    killer.write_text(KILLER.format(repo=str(REPO_ROOT), step=KILL_AT_STEP))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(
        [sys.executable, str(killer), "tiny_resume", "--registry", str(registry), "--output-dir", str(output_dir)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, timeout=timeout_s,
    )


@pytest.mark.slow
def test_sigkill_then_resume_auto_gives_the_uninterrupted_adapter(registry, tmp_path):
    interrupted = tmp_path / "interrupted"
    killed = _train_until_killed(registry, interrupted)
    # alive and training until the known step, then killed there: not finished, not crashed before
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert f"killing myself at the start of step {KILL_AT_STEP} + 1" in killed.stderr
    steps_at_kill = _checkpoint_steps(interrupted)
    assert steps_at_kill == [KILL_AT_STEP], steps_at_kill
    assert not (interrupted / "adapter_config.json").exists()  # nothing looks finished
    assert json.loads((interrupted / "run_summary.json").read_text())["status"] == "running"
    for step in steps_at_kill:
        assert is_complete_checkpoint(interrupted / CHECKPOINT_DIR / f"checkpoint-{step}")

    # Leftovers of a kill in the middle of writing a checkpoint: the staging folder is never resumed from, and the
    # next checkpoint clears it.
    checkpoints = interrupted / CHECKPOINT_DIR
    (checkpoints / CHECKPOINT_STAGING_DIR / "checkpoint-99").mkdir(parents=True)
    assert checkpoint_step(latest_complete_checkpoint(checkpoints)) == max(steps_at_kill)

    # Without --resume the interrupted run is protected; with --resume auto it continues.
    args = ["tiny_resume", "--registry", str(registry), "--output-dir", str(interrupted)]
    assert main(args) == 2
    assert main(args + ["--resume", "auto"]) == 0
    summary = json.loads((interrupted / "run_summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 16
    assert not (checkpoints / CHECKPOINT_STAGING_DIR).exists()

    uninterrupted = tmp_path / "uninterrupted"
    run_recipe(resolve_recipe("tiny_resume", registry), uninterrupted, scoring=harness_scoring())

    resumed_weights = load_file(interrupted / ADAPTER_FILE)
    reference_weights = load_file(uninterrupted / ADAPTER_FILE)
    assert resumed_weights.keys() == reference_weights.keys()
    # Same seed, same data order, restored RNG/optimizer/scheduler state, deterministic CPU kernels: bit-identical.
    for name, reference in reference_weights.items():
        assert torch.equal(resumed_weights[name], reference), name
    assert reference_weights[next(iter(reference_weights))].abs().sum() > 0


def test_latest_complete_checkpoint_skips_incomplete_folders(tmp_path):
    for step, complete in [(3, True), (6, True), (9, False), (12, False)]:
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / ADAPTER_FILE).write_bytes(b"weights")
        if complete:
            (folder / TRAINER_STATE_FILE).write_text("{}")
    (tmp_path / CHECKPOINT_STAGING_DIR / "checkpoint-15").mkdir(parents=True)
    (tmp_path / "checkpoint-final-copy").mkdir()
    assert latest_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-6"
    assert latest_complete_checkpoint(tmp_path / "missing") is None


def test_publish_checkpoint_replaces_a_same_step_folder_by_rename(tmp_path):
    final = tmp_path / "checkpoint-4"
    final.mkdir()
    (final / "old.bin").write_bytes(b"old")
    staging = tmp_path / CHECKPOINT_STAGING_DIR / "checkpoint-4"
    staging.mkdir(parents=True)
    (staging / "new.bin").write_bytes(b"new")
    publish_checkpoint(staging, final)
    assert [p.name for p in final.iterdir()] == ["new.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4"]  # staging and superseded copy gone


def test_resume_path_must_be_a_complete_checkpoint(registry, tmp_path, capsys):
    half_written = tmp_path / "checkpoint-3"
    half_written.mkdir()
    code = main(["tiny_resume", "--registry", str(registry), "--output-dir", str(tmp_path / "out"),
                 "--resume", str(half_written)])
    assert code == 2
    assert "not a complete checkpoint folder" in capsys.readouterr().err


def test_non_finite_loss_stops_with_exit_2_and_keeps_only_finite_checkpoints(registry, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["tiny_fp16_overflow", "--registry", str(registry), "--output-dir", str(out)])
    assert code == 2
    error = capsys.readouterr().err
    assert "error: recipe tiny_fp16_overflow: the loss became nan at step" in error
    assert "Lower learning_rate" in error and "Traceback" not in error
    failed_step = int(error.split("at step ")[1].split(";")[0])

    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["status"] == "failed" and summary["reason"] == "non-finite loss"
    assert not (out / "adapter_config.json").exists()
    steps = _checkpoint_steps(out)
    assert steps, "the run should have checkpointed before the loss overflowed"
    assert max(steps) < failed_step  # the failing step itself is never checkpointed
    for step in steps:
        weights = load_file(out / CHECKPOINT_DIR / f"checkpoint-{step}" / ADAPTER_FILE)
        assert all(torch.isfinite(tensor).all() for tensor in weights.values()), step

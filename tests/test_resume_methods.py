"""Crash and resume for DPO and early-stopping runs: a run killed with SIGKILL after a known checkpoint and continued
with --resume auto ends with the same adapter (bit for bit, on CPU) and the same record as an uninterrupted run; an
early-stopping run continues from the stopping state of the checkpoint it resumes, not from a later evaluation."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from test_dpo import toy_pairs, write_rows
from test_early_stopping import contradicting_data

from conftest import REPO_ROOT
from lora.finetune import main
from lora.recipes.registry import resolve_recipe
from lora.training.checkpoints import checkpoint_step
from lora.training.run import run_recipe
from lora.training.run_folder import CHECKPOINT_DIR

ADAPTER_FILE = "adapter_model.safetensors"
TINY = {"quant_bits": None, "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.1, "lr_scheduler_type": "cosine",
        "warmup_steps": 2, "logging_steps": 1, "batch_size": 8, "max_seq_length": 96}


def _registry(folder, tiny_model_dir, recipes) -> os.PathLike:
    path = folder / "finetune_configs.json"
    path.write_text(json.dumps({name: {"base_model": str(tiny_model_dir), **TINY, **fields}
                                for name, fields in recipes.items()}, indent=2))
    return path


def _checkpoint_steps(output_dir) -> list[int]:
    folder = output_dir / CHECKPOINT_DIR
    steps = (checkpoint_step(p) for p in folder.glob("checkpoint-*")) if folder.is_dir() else ()
    return sorted(step for step in steps if step is not None)


def _kill_after_checkpoint(recipe: str, registry, output_dir, step: int, timeout_s: float = 600) -> None:
    """Start the run, wait for checkpoint-<step>, check the process is still training, then SIGKILL it."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    process = subprocess.Popen([sys.executable, str(REPO_ROOT / "lora/finetune.py"), recipe, "--registry",
                                str(registry), "--output-dir", str(output_dir)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + timeout_s
    while step not in _checkpoint_steps(output_dir):
        if process.poll() is not None:
            pytest.fail(f"training ended before checkpoint-{step}:\n{process.stderr.read().decode()[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"checkpoint-{step} did not appear in time")
        time.sleep(0.02)
    assert process.poll() is None, "the run finished before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    process.stderr.close()
    assert process.returncode == -signal.SIGKILL
    assert json.loads((output_dir / "run_summary.json").read_text())["status"] == "running"
    assert not (output_dir / "adapter_config.json").exists()


def _assert_same_adapter(resumed_dir, reference_dir) -> None:
    resumed, reference = load_file(resumed_dir / ADAPTER_FILE), load_file(reference_dir / ADAPTER_FILE)
    assert resumed.keys() == reference.keys()
    for name, tensor in reference.items():
        assert torch.equal(resumed[name], tensor), name  # same seed, restored RNG/optimizer/scheduler: bit-identical
    assert any(tensor.abs().sum() > 0 for name, tensor in reference.items() if "lora_B" in name)


@pytest.mark.slow
def test_sigkill_then_resume_auto_of_a_dpo_run_gives_the_uninterrupted_adapter(tmp_path, tiny_model_dir):
    # 48 pairs / batch 8 = 6 steps per epoch: 12 steps cross an epoch boundary; dropout and a cosine schedule on.
    train = write_rows(tmp_path / "pairs.jsonl", toy_pairs(48, seed=1))
    held_out = write_rows(tmp_path / "held_out.jsonl", toy_pairs(16, seed=2))
    registry = _registry(tmp_path, tiny_model_dir, {"dpo": {
        "trainer": "dpo", "beta": 0.5, "learning_rate": 0.01, "max_steps": 12, "save_steps": 4,
        "dataset_path": str(train), "validation_path": str(held_out)}})
    interrupted = tmp_path / "interrupted"
    _kill_after_checkpoint("dpo", registry, interrupted, step=4)
    args = ["dpo", "--registry", str(registry), "--output-dir", str(interrupted)]
    assert main(args + ["--resume", "auto"]) == 0

    uninterrupted = tmp_path / "uninterrupted"
    run_recipe(resolve_recipe("dpo", registry), uninterrupted, scoring=None)
    _assert_same_adapter(interrupted, uninterrupted)
    resumed, reference = (json.loads((folder / "run_summary.json").read_text())
                          for folder in (interrupted, uninterrupted))
    assert resumed["steps"] == reference["steps"] == 12
    # The record covers the whole run: the preference log from before the kill too.
    assert [entry["step"] for entry in resumed["preferences"]["history"]] == list(range(1, 13))
    for key in ("held_out_accuracy_before", "held_out_accuracy_after", "history"):
        assert resumed["preferences"][key] == reference["preferences"][key], key


EARLY_STOPPING = {"learning_rate": 0.01, "lr_scheduler_type": "constant", "warmup_steps": 0, "batch_size": 4,
                  "max_steps": 16, "eval_steps": 1, "early_stopping_patience": 2, "save_steps": 1,
                  "save_total_limit": 32}


def _early_stopping_registry(tmp_path, tiny_model_dir):
    train, validation = contradicting_data(tmp_path)
    return _registry(tmp_path, tiny_model_dir, {"stop": {**EARLY_STOPPING, "dataset_path": train,
                                                         "validation_path": validation}})


def _early_stopping_record(folder) -> dict:
    return json.loads((folder / "run_summary.json").read_text())["early_stopping"]


@pytest.mark.slow
def test_sigkill_then_resume_auto_of_an_early_stopping_run_gives_the_uninterrupted_adapter(tmp_path, tiny_model_dir):
    registry = _early_stopping_registry(tmp_path, tiny_model_dir)
    uninterrupted = tmp_path / "uninterrupted"
    run_recipe(resolve_recipe("stop", registry), uninterrupted, scoring=None)
    reference = _early_stopping_record(uninterrupted)
    assert reference["stopped_at_step"] is not None and reference["stopped_at_step"] > 2  # it stops after the kill

    interrupted = tmp_path / "interrupted"
    _kill_after_checkpoint("stop", registry, interrupted, step=2)
    assert main(["stop", "--registry", str(registry), "--output-dir", str(interrupted), "--resume", "auto"]) == 0
    _assert_same_adapter(interrupted, uninterrupted)
    resumed = _early_stopping_record(interrupted)
    for key in ("evaluations", "best_step", "stopped_at_step", "published_step", "reason"):
        assert resumed[key] == reference[key], key


def test_an_early_stopping_run_resumes_from_its_checkpoints_stopping_state(tmp_path, tiny_model_dir):
    """A kill after an evaluation but before the next checkpoint leaves checkpoints/best-adapter/ ahead of the newest
    checkpoint; the resumed run evaluates those steps again and must count them once (fails when the stopping state
    is read from best-adapter/)."""
    registry = _early_stopping_registry(tmp_path, tiny_model_dir)
    uninterrupted = tmp_path / "uninterrupted"
    run_recipe(resolve_recipe("stop", registry), uninterrupted, scoring=None)
    reference = _early_stopping_record(uninterrupted)
    stop = reference["stopped_at_step"]
    assert stop is not None and stop > 2
    assert json.loads((uninterrupted / CHECKPOINT_DIR / "checkpoint-2" / "early-stopping" / "early_stopping.json")
                      .read_text())["evaluations"] == reference["evaluations"][:2]

    # The folder a kill just before checkpoint-3 would leave, but with best-adapter/ holding every later evaluation.
    interrupted = tmp_path / "interrupted"
    shutil.copytree(uninterrupted / CHECKPOINT_DIR, interrupted / CHECKPOINT_DIR)
    for step in _checkpoint_steps(interrupted):
        if step > 2:
            shutil.rmtree(interrupted / CHECKPOINT_DIR / f"checkpoint-{step}")
    summary = json.loads((uninterrupted / "run_summary.json").read_text())
    (interrupted / "run_summary.json").write_text(json.dumps({**summary, "status": "running"}))
    assert main(["stop", "--registry", str(registry), "--output-dir", str(interrupted), "--resume", "auto"]) == 0
    resumed = _early_stopping_record(interrupted)
    for key in ("evaluations", "best_step", "stopped_at_step", "published_step"):
        assert resumed[key] == reference[key], key
    _assert_same_adapter(interrupted, uninterrupted)

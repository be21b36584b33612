"""A real 2-process DDP training on CPU (gloo) through `accelerate launch`: the runner is unchanged, the data is split
across the ranks, only the main process writes, the run record says world size 2, and after the last optimizer step
both ranks hold bit-identical adapters equal to the one published.

`accelerate launch --cpu --num_processes 2` silently runs one process; `--multi_gpu` on a machine without GPUs
starts two gloo processes (../shared/STACK.md): accelerate_configs/cpu_2proc.yaml, which this test launches with.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO_ROOT

ACCELERATE = shutil.which("accelerate", path=str(Path(sys.executable).parent))

# A test-only launcher: it runs lora/finetune.py exactly as `accelerate launch lora/finetune.py` would, after adding
# one callback that, at the end of training, writes every rank's trainable (adapter) weights to DUMP_DIR. The
# runner's own code is untouched; the dump is what each process holds in memory, not what rank 0 saved.
PROBE = '''
import runpy, sys
from pathlib import Path
sys.path.insert(0, {repo!r})
from transformers import TrainerCallback
import lora.training.sft

class DumpAdapterOfEveryRank(TrainerCallback):
    def on_train_end(self, args, state, control, model=None, **kwargs):
        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file
        weights = {{k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()}}
        save_file(weights, str(Path({dump!r}) / f"rank{{args.process_index}}.safetensors"))

build_trainer = lora.training.sft.build_trainer

def build_trainer_with_dump(*args, **kwargs):
    trainer, history = build_trainer(*args, **kwargs)
    trainer.add_callback(DumpAdapterOfEveryRank())
    return trainer, history

lora.training.sft.build_trainer = build_trainer_with_dump
sys.argv = [str(Path({repo!r}) / "lora/finetune.py")] + sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
'''


@pytest.fixture(scope="module")
def registry(tmp_path_factory, tiny_model_dir):
    folder = tmp_path_factory.mktemp("registry")
    common = {
        "base_model": str(tiny_model_dir),
        "dataset_path": str(REPO_ROOT / "data/train/sentiment_train.jsonl"),
        # 48 rows, batch 4 per process, 1 epoch: 12 steps on one process, 6 when two processes share the data.
        "max_train_examples": 48, "num_epochs": 1, "batch_size": 4, "learning_rate": 0.01, "lora_r": 4,
        "lora_alpha": 8, "lora_dropout": 0.1, "logging_steps": 2, "warmup_steps": 0, "max_seq_length": 96,
        "save_steps": 3,
        # Scored on the main process only, before and after training: the other rank must wait, not deadlock.
        "eval_tasks": ["sentiment"], "eval_limit": 4,
    }
    recipes = {
        "ddp_lora_fp32": {**common, "quant_bits": None},
        "ddp_dora_4bit": {**common, "quant_bits": 4, "use_dora": True, "bnb_4bit_compute_dtype": "float32"},
    }
    path = folder / "finetune_configs.json"
    path.write_text(json.dumps(recipes, indent=2))
    return path


@contextmanager
def _a_port_held_busy() -> Iterator[int]:
    """A loopback port kept listening for the whole launch. accelerate finds it taken and has torchrun pick and bind
    a free port itself (its standalone rendezvous, localhost:0): no port is picked here, closed, and bound there a
    moment later, when another process may have taken it."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        yield busy.getsockname()[1]


def _launch_two_processes(registry, recipe: str, output_dir: Path, dump_dir: Path) -> subprocess.CompletedProcess:
    probe = dump_dir / "probe.py"
    probe.write_text(PROBE.format(repo=str(REPO_ROOT), dump=str(dump_dir)))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           "CUDA_VISIBLE_DEVICES": ""}
    # The shipped config: MULTI_GPU with 2 processes, which on a machine without CUDA means 2 gloo processes (the
    # same as --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no).
    with _a_port_held_busy() as busy_port:
        command = [ACCELERATE, "launch", "--config_file", str(REPO_ROOT / "accelerate_configs/cpu_2proc.yaml"),
                   "--main_process_port", str(busy_port),
                   str(probe), recipe, "--registry", str(registry), "--output-dir", str(output_dir)]
        return subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=dump_dir)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["ddp_lora_fp32", pytest.param("ddp_dora_4bit", marks=pytest.mark.slow)])
def test_two_process_training_keeps_ranks_identical_and_records_world_size_2(registry, tmp_path, recipe):
    assert ACCELERATE, "the accelerate CLI is installed with the accelerate package"
    out, dump = tmp_path / "out", tmp_path / "dump"
    dump.mkdir()
    result = _launch_two_processes(registry, recipe, out, dump)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]

    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["status"] == "completed" and summary["world_size"] == 2
    assert summary["steps"] == 6  # the 12 batches of the epoch were split between the two processes
    assert set(summary["eval_after"]) == {"sentiment"} and summary["eval_after"]["sentiment"]["n"] == 4

    rank0, rank1 = load_file(dump / "rank0.safetensors"), load_file(dump / "rank1.safetensors")
    published = load_file(out / "adapter_model.safetensors")
    assert rank0.keys() == rank1.keys() == published.keys()
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), f"ranks diverged on {name}"
        assert torch.equal(rank0[name], published[name]), f"published adapter differs from rank 0 on {name}"
    if recipe.startswith("ddp_dora"):
        assert any(name.endswith("lora_magnitude_vector") for name in published)

    # Only the main process writes and talks: one milestone of each kind, one set of final files.
    milestones = [line for line in result.stdout.splitlines() if line.startswith("[finetune]")]
    assert len(milestones) == len(set(milestones)), result.stdout  # no line printed by both ranks
    assert "2 process(es)" in milestones[0] and milestones[-2].startswith("[finetune] done in"), milestones
    assert not list(out.glob(".staging-*"))
    checkpoint = out / "checkpoints" / "checkpoint-6"
    assert {p.name for p in checkpoint.glob("rng_state*.pth")} == {"rng_state_0.pth", "rng_state_1.pth"}

"""`"auto"` dtypes: one function chooses bf16 where it is native and fp32 elsewhere; the choice is recorded."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch

from conftest import REPO_ROOT
from lora.core.compute_dtype import choose_dtype, cpu_flags, cpu_kind, dtype_for
from lora.finetune import harness_scoring
from lora.recipes.registry import resolve_recipe
from lora.training.run import recipe_notes, run_recipe


@pytest.mark.parametrize(("cuda_bf16", "flags", "expected", "reason"), [
    (None, {"avx2", "fma", "avx512f"}, "float32", "emulated"),       # AMD EPYC Zen 2/3, older Xeons
    (None, {"avx2", "avx512f", "avx512_bf16"}, "bfloat16", "avx512_bf16"),  # AMD EPYC Zen 4/5
    (None, {"avx512_bf16", "amx_bf16", "amx_tile"}, "bfloat16", "amx_bf16"),  # Intel Xeon Sapphire Rapids+
    (True, set(), "bfloat16", "CUDA device with bf16"),
    (False, {"amx_bf16"}, "float32", "CUDA device without bf16"),   # the GPU computes, not the CPU
])
def test_the_decision_per_kind_of_hardware(cuda_bf16, flags, expected, reason):
    name, why = dtype_for(cuda_bf16, flags)
    assert name == expected and reason in why


def test_this_machine_gets_what_its_cpu_flags_say():
    text = open("/proc/cpuinfo").read()
    native = bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", text))
    name, reason = choose_dtype()
    if torch.cuda.is_available():
        assert name == ("bfloat16" if torch.cuda.is_bf16_supported() else "float32")
    else:
        assert name == ("bfloat16" if native else "float32"), reason
        assert ("native bf16" in reason) == native
    assert cpu_flags() and "fpu" in cpu_flags()


def _registry(tmp_path, tiny_model_dir, **fields):
    recipe = {"base_model": str(tiny_model_dir), "dataset_path": str(REPO_ROOT / "data/train/sentiment_train.jsonl"),
              "quant_bits": 4, "bnb_4bit_compute_dtype": "auto", "dtype": "auto", "use_dora": True,
              "max_train_examples": 16, "max_steps": 2, "batch_size": 8, "lora_r": 4, "lora_alpha": 8,
              "lora_dropout": 0.0, "max_seq_length": 64, "logging_steps": 1, **fields}
    path = tmp_path / "finetune_configs.json"
    path.write_text(json.dumps({"tiny_auto": recipe}))
    return path


def test_auto_is_resolved_and_recorded(tmp_path, tiny_model_dir):
    recipe = resolve_recipe("tiny_auto", _registry(tmp_path, tiny_model_dir))
    name, reason = choose_dtype()
    assert recipe["bnb_4bit_compute_dtype"] == name and recipe["dtype"] == name
    expected = {"from": "auto", "value": name, "reason": reason}
    assert recipe.to_record()["auto_dtypes"] == {"bnb_4bit_compute_dtype": expected, "dtype": expected}
    assert resolve_recipe("tiny_auto", _registry(tmp_path, tiny_model_dir, dtype="float32")).auto_dtypes.keys() == {
        "bnb_4bit_compute_dtype"}


def test_a_recipe_with_auto_runs_and_records_the_choice(tmp_path, tiny_model_dir):
    recipe = resolve_recipe("tiny_auto", _registry(tmp_path, tiny_model_dir))
    result = run_recipe(recipe, tmp_path / "out", scoring=harness_scoring())
    assert result.summary["status"] == "completed" and result.summary["steps"] == 2
    name, _ = choose_dtype()
    assert result.summary["auto_dtypes"]["bnb_4bit_compute_dtype"]["value"] == name
    saved = json.loads((tmp_path / "out" / "recipe.json").read_text())
    assert saved["bnb_4bit_compute_dtype"] == name and saved["auto_dtypes"]["dtype"]["from"] == "auto"
    assert json.loads((tmp_path / "out" / "run_summary.json").read_text())["auto_dtypes"] == recipe.auto_dtypes
    base = result.model.get_base_model().model.layers[0].self_attn.q_proj.base_layer
    assert base.compute_dtype == getattr(torch, name)


def test_shipped_default_recipe_uses_auto_and_dry_run_says_so():
    result = subprocess.run([sys.executable, "lora/finetune.py", "sentiment_smollm2_135m_4bits_r8_dora", "--dry-run"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    name, reason = choose_dtype()
    assert printed["bnb_4bit_compute_dtype"] == name
    assert printed["auto_dtypes"]["bnb_4bit_compute_dtype"]["from"] == "auto"
    assert f'bnb_4bit_compute_dtype "auto" -> {name} ({reason})' in result.stderr


def test_dora_with_dropout_says_what_it_costs(tmp_path, tiny_model_dir):
    with_dropout = resolve_recipe("tiny_auto", _registry(tmp_path, tiny_model_dir, lora_dropout=0.05))
    assert any("second time on the dropped-out input" in note and "lora_dropout 0" in note
               for note in recipe_notes(with_dropout))
    for quiet in ({"lora_dropout": 0.0}, {"lora_dropout": 0.05, "use_dora": False}):
        recipe = resolve_recipe("tiny_auto", _registry(tmp_path, tiny_model_dir, **quiet))
        assert not any("dropped-out" in note for note in recipe_notes(recipe))


@pytest.mark.parametrize(("flags", "kind"), [
    ({"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}, "AVX512-BF16 + AMX"),
    ({"avx2", "avx512f", "avx512_bf16"}, "AVX512-BF16"),
    ({"avx2", "fma"}, "AVX2, no AVX512-BF16"),
    (set(), "no AVX2"),
])
def test_cpu_kind_names_each_kind_these_machines_come_in(flags, kind):
    assert cpu_kind(flags) == kind

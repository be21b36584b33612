"""lora/merge.py: merged logits equal the unmerged adapter's (LoRA and DoRA, fp32), never into a quantised base."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lora.adapters.merge import MERGE_RECORD, MergeCheckFailed, merge_adapter
from lora.core.locks import lock_path_for
from lora.merge import main as merge_main
from tiny_model import build_tiny_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]


def save_random_adapter(
    base_dir: Path,
    out_dir: Path,
    *,
    use_dora: bool,
    seed: int = 1,
    recipe: dict | None = None,
    **lora_kwargs,
) -> Path:
    """A peft adapter for the tiny base with non-trivial weights (B and the magnitudes away from their init).

    Freshly initialised adapters are the identity (B = 0, m = ||W0||), which would let any merge pass; training is
    replaced by random perturbations of every adapter tensor.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    settings = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]}
    settings.update(lora_kwargs)
    model = get_peft_model(base, LoraConfig(use_dora=use_dora, task_type="CAUSAL_LM", **settings))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
            elif "lora_magnitude_vector" in name:
                parameter.mul_(1 + 0.2 * torch.randn(parameter.shape, generator=generator))
    model.peft_config["default"].base_model_name_or_path = str(base_dir)
    model.save_pretrained(out_dir)
    build_tiny_tokenizer().save_pretrained(out_dir)
    if recipe is not None:
        (Path(out_dir) / "recipe.json").write_text(json.dumps({"base_model": str(base_dir), **recipe}))
    return Path(out_dir)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_merged_model_reproduces_unmerged_logits_in_fp32(tiny_model_dir, tmp_path, use_dora):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = save_random_adapter(tiny_model_dir, tmp_path / "adapter", use_dora=use_dora, use_rslora=use_dora)
    out = tmp_path / "merged"
    record = merge_adapter(adapter, out, dtype="fp32")

    assert record["check"]["max_abs_logit_diff_fp32"] <= 1e-4
    assert {"config.json", "model.safetensors", "tokenizer.json", MERGE_RECORD} <= {p.name for p in out.iterdir()}
    # the build folder is gone; only the (empty) one-writer lock file stays beside the output
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".merged")] == [lock_path_for(out).name]
    saved = json.loads((out / MERGE_RECORD).read_text())
    assert saved["adapter_type"] == ("DoRA" if use_dora else "LoRA")
    assert saved["check"]["max_abs_logit_diff_fp32"] == record["check"]["max_abs_logit_diff_fp32"]

    # The saved folder is a plain transformers model (no peft) whose logits are the adapted model's, not the base's.
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    ids = AutoTokenizer.from_pretrained(out)("Revenue rose", return_tensors="pt").input_ids
    with torch.no_grad():
        assert (merged(ids).logits - base(ids).logits).abs().max() > 1e-3


def _independent_logits(model, tokenizer, prompts):
    with torch.no_grad():
        return [model(**tokenizer(p, return_tensors="pt", add_special_tokens=False)).logits.float() for p in prompts]


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_the_self_check_measures_the_merged_model_against_the_adapter_on_its_base(tiny_model_dir, tmp_path, use_dora):
    """Measured here without merge's own code: the saved merged model against a fresh base carrying the adapter.
    The difference merge reports is that one, and a tolerance below it makes merge refuse and write nothing."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = save_random_adapter(tiny_model_dir, tmp_path / "adapter", use_dora=use_dora)
    record = merge_adapter(adapter, tmp_path / "merged", dtype="fp32")
    prompts = record["check"]["prompts"]
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, str(adapter)).eval()
    pairs = zip(_independent_logits(merged, tokenizer, prompts), _independent_logits(adapted, tokenizer, prompts))
    measured = max(float((a - b).abs().max()) for a, b in pairs)

    assert 0 < measured <= 1e-4  # fp32 rounding: small, never exactly zero on these weights
    assert record["check"]["max_abs_logit_diff_fp32"] == pytest.approx(measured, rel=0.5)
    with pytest.raises(MergeCheckFailed, match="differ from the unmerged adapter"):
        merge_adapter(adapter, tmp_path / "strict", dtype="fp32", tolerance=measured / 10)
    assert not (tmp_path / "strict").exists()


def test_adapter_trained_on_4bit_merges_into_unquantised_base_in_bf16(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    adapter = save_random_adapter(
        tiny_model_dir, tmp_path / "adapter", use_dora=True,
        recipe={"quant_bits": 4, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": "bfloat16"},
    )
    record = merge_adapter(adapter, tmp_path / "merged", dtype="bf16")

    assert record["adapter_trained_on_quant_bits"] == 4
    assert record["merged_into"] == "unquantised base, float32"
    assert record["check"]["max_abs_logit_diff_fp32"] <= 1e-4
    assert record["check"]["max_abs_logit_diff_saved_dtype_vs_unmerged_fp32"] is not None
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert merged.dtype == torch.bfloat16
    assert all(type(module).__name__ != "Linear4bit" for module in merged.modules())


def test_cli_refuses_existing_output_and_missing_adapter_with_exit_2(tiny_model_dir, tmp_path, capsys):
    adapter = save_random_adapter(tiny_model_dir, tmp_path / "adapter", use_dora=False)
    (tmp_path / "taken").mkdir()
    script = str(REPO_ROOT / "lora" / "merge.py")

    taken = subprocess.run([sys.executable, script, str(adapter), "--out", str(tmp_path / "taken")],
                           capture_output=True, text=True, cwd=tmp_path)
    assert taken.returncode == 2, taken.stderr
    assert "already exists" in taken.stderr and "--overwrite" in taken.stderr
    assert "Traceback" not in taken.stderr

    assert merge_main([str(tmp_path / "nope"), "--out", str(tmp_path / "m")]) == 2
    assert "does not exist" in capsys.readouterr().err

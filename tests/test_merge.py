"""lora/merge.py: merged logits equal the unmerged adapter's (LoRA and DoRA, fp32), never into a quantised base."""

from __future__ import annotations

import json
import math
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
    # the tolerance is the largest difference allowed: the measured one itself passes
    exact = record["check"]["max_abs_logit_diff_fp32"]
    assert merge_adapter(adapter, tmp_path / "exact", dtype="fp32", tolerance=exact)["check"]["tolerance"] == exact
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


# ---- what merge writes and says, its refusals, each at its edges -------------------------------------------------


def _copy_base(tiny_model_dir: Path, folder: Path, dtype: torch.dtype | None = None) -> Path:
    """The tiny base saved again elsewhere (optionally in another dtype): a second, distinguishable base folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype or torch.float32)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(folder)
    return folder


def test_the_merge_record_and_the_printed_lines_say_what_was_merged_from_what(tiny_model_dir, tmp_path, capsys):
    import time

    from lora.adapters.merge import CHAT_CHECK_PROMPT, CHECK_PROMPTS

    adapter = save_random_adapter(
        tiny_model_dir, tmp_path / "adapter", use_dora=True,
        recipe={"quant_bits": 4, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": "bfloat16"},
    )
    other_base = _copy_base(tiny_model_dir, tmp_path / "other_base")
    out = tmp_path / "merged"
    started = time.monotonic()
    record = merge_adapter(adapter, out, dtype="bf16", base_model=str(other_base), tolerance=5e-4)
    elapsed = time.monotonic() - started

    assert json.loads((out / MERGE_RECORD).read_text()) == record
    check = record.pop("check")
    seconds = record.pop("seconds")
    assert record == {
        "adapter": str(adapter.resolve()),
        "adapter_type": "DoRA",
        "base_model": str(tiny_model_dir),  # what the adapter's records name, beside what was used
        "base_model_path": str(other_base),
        "base_model_origin": f"local folder {other_base}",
        "adapter_trained_on_quant_bits": 4,
        "merged_into": "unquantised base, float32",
        "note": "trained on a 4-bit base: the merged model holds the unquantised W0, so it differs from the "
                "training-time model by the base's quantisation error (not by the merge).",
        "saved_dtype": "bfloat16",
    }
    # the fixed prompts and one chat turn in the tokenizer's template, ending where the assistant's answer starts
    assert check["prompts"] == [*CHECK_PROMPTS, f"<|user|>{CHAT_CHECK_PROMPT}<|assistant|>"]
    assert check["tolerance"] == 5e-4 and 0 < check["max_abs_logit_diff_fp32"] <= 5e-4
    assert check["max_abs_logit_diff_saved_dtype_vs_unmerged_fp32"] > check["max_abs_logit_diff_fp32"]  # bf16 rounding
    assert isinstance(seconds, float) and seconds == round(seconds, 1)
    assert 0 <= seconds <= elapsed + 0.05  # rounded to a tenth of a second
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("merge: ")]
    assert printed == [
        f"merge: DoRA adapter {adapter.resolve()} onto {other_base} (unquantised, float32)",
        f"merge: max |merged - unmerged| logit difference (float32, 3 prompts): {check['max_abs_logit_diff_fp32']:.3e}",
        "merge: after casting to bfloat16: max |saved - unmerged float32| = "
        f"{check['max_abs_logit_diff_saved_dtype_vs_unmerged_fp32']:.3e}",
        f"merge: saved bfloat16 model + tokenizer to {out} ({seconds} s)",
    ]


def test_a_float32_merge_of_an_adapter_trained_unquantised_records_no_cast_and_no_note(tiny_model_dir, tmp_path):
    adapter = save_random_adapter(tiny_model_dir, tmp_path / "adapter", use_dora=False)
    record = merge_adapter(adapter, tmp_path / "merged", dtype="fp32")
    assert record["adapter_type"] == "LoRA" and record["saved_dtype"] == "float32"
    assert record["adapter_trained_on_quant_bits"] is None and record["note"] is None
    assert record["check"]["max_abs_logit_diff_saved_dtype_vs_unmerged_fp32"] is None  # nothing was cast


def test_without_dtype_the_merged_model_keeps_the_dtype_its_base_was_saved_in(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from lora.adapters.merge import default_dtype_name

    bf16_base = _copy_base(tiny_model_dir, tmp_path / "bf16_base", torch.bfloat16)
    adapter = save_random_adapter(bf16_base, tmp_path / "adapter", use_dora=False)
    record = merge_adapter(adapter, tmp_path / "merged")
    assert record["saved_dtype"] == "bfloat16"
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "merged").dtype == torch.bfloat16
    # The rule itself: the saved dtype when it is one merge writes, float32 for anything else or no readable config.
    for name, config in {"dtype": {"dtype": "float16"}, "torch_dtype": {"torch_dtype": "bfloat16"},
                         "int8": {"dtype": "int8"}, "none": {}, "broken": None, "missing": ...}.items():
        folder = tmp_path / "configs" / name
        folder.mkdir(parents=True)
        if config is None:
            (folder / "config.json").write_text("{not json")
        elif config is not ...:
            (folder / "config.json").write_text(json.dumps(config))
        expected = {"dtype": "float16", "torch_dtype": "bfloat16"}.get(name, "float32")
        assert default_dtype_name(str(folder)) == expected, name


def test_a_bad_dtype_is_refused_naming_the_choices_before_anything_is_written(tiny_model_dir, tmp_path):
    from lora.core.errors import UserError

    adapter = save_random_adapter(tiny_model_dir, tmp_path / "adapter", use_dora=False)
    with pytest.raises(UserError) as refused:
        merge_adapter(adapter, tmp_path / "merged", dtype="fp64")
    assert str(refused.value) == '--dtype must be one of fp32, bf16, fp16, not "fp64".'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_outputs_merge_may_not_replace_are_refused_and_an_earlier_merge_is_replaced_only_with_overwrite(
    tiny_model_dir, tmp_path
):
    from lora.core.errors import OutputError

    adapter = save_random_adapter(tiny_model_dir, tmp_path / "adapter", use_dora=False)
    users = tmp_path / "users_folder"
    users.mkdir()
    (users / "notes.txt").write_text("mine")
    with pytest.raises(OutputError) as refused:
        merge_adapter(adapter, users, dtype="fp32", overwrite=True)
    assert str(refused.value).startswith(
        f"--out {users} is not a merged model written by this tool (it has no {MERGE_RECORD}, which lora/merge.py "
        "writes into each; it holds: notes.txt)")
    assert (users / "notes.txt").read_text() == "mine"
    for out, what, folder in ((adapter / "merged", "the adapter folder", adapter.resolve()),
                              (Path(tiny_model_dir) / "merged", "the base model folder", Path(tiny_model_dir))):
        with pytest.raises(OutputError) as refused:
            merge_adapter(adapter, out, dtype="fp32")
        assert str(refused.value).startswith(f"the output {out} lies inside {what} {folder}, which this command reads")
    # checked before any model loads: a base folder that holds no model yet still gets the output refusal first
    not_a_model = tmp_path / "not_a_model"
    not_a_model.mkdir()
    with pytest.raises(OutputError, match=f"lies inside the base model folder {not_a_model},"):
        merge_adapter(adapter, not_a_model / "merged", dtype="fp32", base_model=str(not_a_model))

    out = tmp_path / "merged"
    first = merge_adapter(adapter, out, dtype="fp32")
    with pytest.raises(OutputError, match="already exists"):  # overwrite is off unless asked for
        merge_adapter(adapter, out, dtype="bf16")
    assert json.loads((out / MERGE_RECORD).read_text()) == first
    assert merge_adapter(adapter, out, dtype="bf16", overwrite=True)["saved_dtype"] == "bfloat16"
    assert json.loads((out / MERGE_RECORD).read_text())["saved_dtype"] == "bfloat16"


def test_a_quantised_base_is_refused_whether_its_layers_or_its_model_say_so(tiny_model_dir, tmp_path):
    """bitsandbytes layers (a checkpoint saved quantised), or a model transformers marks `is_quantized` (a method
    whose layers are not bitsandbytes', e.g. GPTQ): merging into either would re-quantise the merged weights."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    import lora.models.bnb_cpu_fixes  # noqa: F401  (before a quantised load on CPU)
    from lora.adapters.merge import refuse_quantised_base
    from lora.core.errors import UserError

    quantised_base = tmp_path / "quantised_base"
    quantisation = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=quantisation).save_pretrained(
        quantised_base)
    build_tiny_tokenizer().save_pretrained(quantised_base)
    adapter = save_random_adapter(tiny_model_dir, tmp_path / "adapter", use_dora=False)
    with pytest.raises(UserError) as refused:
        merge_adapter(adapter, tmp_path / "merged", dtype="fp32", base_model=str(quantised_base))
    assert str(refused.value) == (
        f"the base model at {quantised_base} is a pre-quantised checkpoint; merging into it would re-quantise the "
        "merged weights and change the outputs. Pass --base-model pointing at the unquantised (fp16/bf16/fp32) "
        "weights of the same model.")
    assert not (tmp_path / "merged").exists()

    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    refuse_quantised_base(plain, "plain")  # nothing to refuse
    plain.is_quantized = True
    with pytest.raises(UserError, match="the base model at marked is a pre-quantised checkpoint"):
        refuse_quantised_base(plain, "marked")


def test_logit_differences_are_compared_pair_by_pair_and_a_nan_is_never_hidden():
    from lora.adapters.merge import max_abs_difference

    one = [torch.zeros(1, 2, 3)]
    assert max_abs_difference(one + [torch.ones(1, 2, 3)], one + [torch.zeros(1, 2, 3)]) == 1.0
    with pytest.raises(ValueError):
        max_abs_difference(one, one + one)
    nan = torch.full((1, 2, 3), float("nan"))
    for pair in ((one + [nan], one + one), ([nan] + one, one + one)):  # a NaN is never hidden by a finite value
        assert math.isnan(max_abs_difference(*pair))


def test_an_output_inside_the_hugging_face_cache_copy_of_the_base_is_refused(tiny_model_dir, tmp_path, monkeypatch):
    """A base named by hub id resolves to its cached snapshot only once loaded (offline); writing the merged model
    there would put files into the cache's copy of the base."""
    import shutil

    from huggingface_hub import constants

    from lora.core.errors import OutputError

    cache = tmp_path / "hf_cache"
    snapshot = cache / "models--acme--tiny-base" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_model_dir, snapshot)
    (cache / "models--acme--tiny-base" / "refs").mkdir()
    (cache / "models--acme--tiny-base" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    adapter = save_random_adapter(tiny_model_dir, tmp_path / "adapter", use_dora=False)
    out = snapshot / "merged"
    with pytest.raises(OutputError) as refused:
        merge_adapter(adapter, out, dtype="fp32", base_model="acme/tiny-base")
    assert str(refused.value).startswith(f"the output {out} lies inside the base model folder {snapshot},")
    assert not out.exists()
    assert merge_adapter(adapter, tmp_path / "merged", dtype="fp32", base_model="acme/tiny-base")[
        "base_model_path"] == str(snapshot)


def test_an_adapter_with_nan_weights_is_refused_naming_the_tensor_and_nothing_is_written(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    from lora.core.errors import UserError

    adapter = save_random_adapter(tiny_model_dir, tmp_path / "adapter", use_dora=False)

    weights = load_file(adapter / "adapter_model.safetensors")
    name = next(key for key in weights if "lora_B" in key)
    weights[name][0, 0] = float("nan")
    save_file(weights, adapter / "adapter_model.safetensors")
    with pytest.raises(UserError) as refused:
        merge_adapter(adapter, tmp_path / "merged", dtype="fp32")
    assert str(refused.value).startswith(
        f"{adapter.resolve() / 'adapter_model.safetensors'}: tensor {name} holds 1 NaN or infinite value(s) of ")
    assert not (tmp_path / "merged").exists()

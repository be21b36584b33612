"""Merging a LoRA or DoRA adapter into its UNQUANTISED base (float32), with a logit self-check against the unmerged
adapter before anything is written, and a merge record. `python lora/merge.py` is the command.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

import lora.models.bnb_cpu_fixes  # noqa: F401  (before any model loads)
from lora.adapters.folders import (
    local_base_model_folder,
    read_adapter_records,
    refuse_if_normalised,
    refuse_non_finite_weights,
)
from lora.adapters.inference import load_base_for_adapter
from lora.core.errors import UserError
from lora.core.files import claim_output_folder, refuse_output_over_inputs
from lora.models.quantisation import QuantisationSettings

__all__ = [
    "CHAT_CHECK_PROMPT",
    "CHECK_PROMPTS",
    "check_prompts",
    "default_dtype_name",
    "DEFAULT_TOLERANCE",
    "DTYPE_NAMES",
    "max_abs_difference",
    "merge_adapter",
    "MERGE_RECORD",
    "MergeCheckFailed",
    "prompt_logits",
    "refuse_quantised_base",
]

MERGE_RECORD = "merge_record.json"
DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
# Short, varied prompts: plain text, a number-heavy line and a chat-formatted turn (when the tokenizer has a template).
CHECK_PROMPTS = (
    "The company reported quarterly revenue of",
    "Shares fell 3.2% after the bank cut its 2024 guidance; analysts said",
)
CHAT_CHECK_PROMPT = "What is the sentiment of this headline? Profits rose sharply."
DEFAULT_TOLERANCE = 1e-3


class MergeCheckFailed(Exception):
    """The merged model's logits differ from the unmerged model's by more than the tolerance."""


def check_prompts(tokenizer) -> list[str]:
    """The prompts the self-check runs: the fixed texts plus one chat turn rendered by the tokenizer's template."""
    prompts = list(CHECK_PROMPTS)
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": CHAT_CHECK_PROMPT}]
        prompts.append(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    return prompts


@torch.no_grad()
def prompt_logits(model, tokenizer, prompts: list[str]) -> list[torch.Tensor]:
    """Float32 logits of each prompt, run one at a time (no padding, so nothing depends on the pad side)."""
    outputs = []
    for prompt in prompts:
        encoded = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        outputs.append(model(**encoded).logits.float())
    return outputs


def max_abs_difference(first: list[torch.Tensor], second: list[torch.Tensor]) -> float:
    """Largest absolute element difference over pairs of same-shaped tensors; NaN when any difference is NaN
    (Python's max would return whichever came first, so a NaN after a finite value would pass the check)."""
    differences = [float((a - b).abs().max()) for a, b in zip(first, second, strict=True)]
    return math.nan if any(math.isnan(difference) for difference in differences) else max(differences)


def refuse_quantised_base(model, base_path: str) -> None:
    """Raise when the loaded base carries quantised layers (a pre-quantised checkpoint): we never merge into one."""
    import bitsandbytes as bnb

    quantised_types = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    quantised = getattr(model, "is_quantized", False) or any(isinstance(m, quantised_types) for m in model.modules())
    if quantised:
        raise UserError(
            f"the base model at {base_path} is a pre-quantised checkpoint; merging into it would re-quantise the "
            "merged weights and change the outputs. Pass --base-model pointing at the unquantised (fp16/bf16/fp32) "
            "weights of the same model."
        )


def default_dtype_name(base_path: str) -> str:
    """The dtype the base checkpoint was saved in (its config.json), when it is one we write; else float32.

    Read from the file because the loaded model's config reports the float32 we loaded it in.
    """
    try:
        config = json.loads((Path(base_path) / "config.json").read_text())
    except (OSError, ValueError):
        return "float32"
    saved = str(config.get("dtype") or config.get("torch_dtype") or "float32")
    return saved if saved in DTYPE_NAMES.values() else "float32"


def merge_adapter(
    adapter_dir: str | Path,
    out: str | Path,
    dtype: str | None = None,
    base_model: str | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    overwrite: bool = False,
) -> dict:
    """Merge an adapter into its unquantised base, check the result, and save model + tokenizer + merge record.

    Args:
        adapter_dir: a peft adapter folder (a training run's output folder).
        out: the folder to write; it must not exist unless `overwrite`.
        dtype: "fp32", "bf16" or "fp16" for the saved weights; None keeps the base model's saved dtype.
        base_model: overrides the base named in the adapter's records (hub id or folder).
        tolerance: largest allowed |merged - unmerged| logit difference (float32) before the merge counts as failed.
        overwrite: replace an existing `out`.

    Returns:
        The merge record (also written to `out/merge_record.json`).

    Raises:
        UserError: the adapter is missing, normalised, or its base cannot be found or is pre-quantised.
        MergeCheckFailed: the self-check exceeded `tolerance` (nothing is written to `out`).
        OutputError: `out` is (inside) an input, a file, a folder merge.py did not write, or being written by
            another command (`lora.core.files.claim_output_folder`).
    """
    adapter_dir = Path(adapter_dir).expanduser().resolve()
    out = Path(out).expanduser().absolute()  # resolved by claim_output_folder; messages show it as given
    records = read_adapter_records(adapter_dir)
    refuse_if_normalised(adapter_dir)
    refuse_non_finite_weights(adapter_dir)
    if dtype is not None and dtype not in DTYPE_NAMES:
        raise UserError(f'--dtype must be one of {", ".join(DTYPE_NAMES)}, not "{dtype}".')
    inputs = (("the adapter folder", adapter_dir),
              ("the base model folder", local_base_model_folder(adapter_dir, base_model)))
    # Held from here to the end: one writer per output, and `out` checked before minutes of model loading.
    with claim_output_folder(out, overwrite=overwrite, record=MERGE_RECORD, made_by="lora/merge.py",
                             kind="a merged model", inputs=inputs) as claim:
        record = _merge_into(claim, adapter_dir, records, dtype, base_model, tolerance)
    print(f"merge: saved {record['saved_dtype']} model + tokenizer to {out} ({record['seconds']} s)", flush=True)
    return record


def _merge_into(claim, adapter_dir: Path, records, dtype: str | None, base_model: str | None,
                tolerance: float) -> dict:
    """Load, merge, self-check and write into `claim`'s build folder, then publish it; returns the merge record."""
    from peft import PeftModel

    out = claim.out
    started = time.monotonic()
    base = load_base_for_adapter(adapter_dir, base_override=base_model,
                                 quantisation=QuantisationSettings.unquantised("float32"))
    model, tokenizer, base_path, origin = base.model, base.tokenizer, base.base_path, base.base_origin
    refuse_quantised_base(model, base_path)
    refuse_output_over_inputs(out, [("the base model folder", base_path)])  # a hub id: its cache folder
    dtype_name = DTYPE_NAMES[dtype] if dtype else default_dtype_name(base_path)
    kind = "DoRA" if records.is_dora else "LoRA"
    print(f"merge: {kind} adapter {adapter_dir} onto {base_path} (unquantised, float32)", flush=True)

    peft_model = PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    prompts = check_prompts(tokenizer)
    unmerged = prompt_logits(peft_model, tokenizer, prompts)
    merged_model = peft_model.merge_and_unload(safe_merge=True).eval()
    merged = prompt_logits(merged_model, tokenizer, prompts)
    max_diff = max_abs_difference(merged, unmerged)
    print(f"merge: max |merged - unmerged| logit difference (float32, {len(prompts)} prompts): {max_diff:.3e}",
          flush=True)
    if not max_diff <= tolerance:
        raise MergeCheckFailed(
            f"the merged model's logits differ from the unmerged adapter's by {max_diff:.3e} "
            f"(tolerance {tolerance:g}); nothing was written to {out}."
        )

    saved_diff = None
    if dtype_name != "float32":
        merged_model = merged_model.to(getattr(torch, dtype_name))
        saved_diff = max_abs_difference(prompt_logits(merged_model, tokenizer, prompts), unmerged)
        print(f"merge: after casting to {dtype_name}: max |saved - unmerged float32| = {saved_diff:.3e}", flush=True)

    record = {
        "adapter": str(adapter_dir),
        "adapter_type": kind,
        "base_model": records.base_model,
        "base_model_path": base_path,
        "base_model_origin": origin,
        "adapter_trained_on_quant_bits": records.trained_quant_bits,
        "merged_into": "unquantised base, float32",
        "note": None if records.trained_quant_bits is None else (
            f"trained on a {records.trained_quant_bits}-bit base: the merged model holds the unquantised W0, so it "
            "differs from the training-time model by the base's quantisation error (not by the merge)."
        ),
        "saved_dtype": dtype_name,
        "check": {
            "prompts": prompts,
            "max_abs_logit_diff_fp32": max_diff,
            "max_abs_logit_diff_saved_dtype_vs_unmerged_fp32": saved_diff,
            "tolerance": tolerance,
        },
        "seconds": round(time.monotonic() - started, 1),
    }
    build = claim.new_build()
    merged_model.config.dtype = getattr(torch, dtype_name)
    merged_model.save_pretrained(build)
    tokenizer.save_pretrained(build)
    (build / MERGE_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    claim.publish()
    return record


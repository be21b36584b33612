"""From a resolved recipe to library objects: quantisation config, tokenizer, base model, LoRA/DoRA config.

Pure builder functions in the style of TRL's `get_quantization_config` / `get_peft_config`. The bitsandbytes CPU
neutralisers are imported first so that no quantised layer is ever built without them.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

import lora.models.bnb_cpu_fixes  # noqa: F401  (must run before any quantised model is built)
from lora.core.errors import ModelSourceError
from lora.models.quantisation import (
    QuantisationSettings,
    count_quantised_layers,
    quantisation_mismatch,
    requested_bits,
    torch_dtype,
)

__all__ = ["check_weight_files", "device_map_for_this_process", "load_base_model", "load_tokenizer"]


def device_map_for_this_process():
    """Each process holds its own full copy on its own device (never `device_map="auto"` under DDP)."""
    if torch.cuda.is_available():
        return {"": int(os.environ.get("LOCAL_RANK", 0))}
    return None


def load_tokenizer(model_path: str, trust_remote_code: bool = False):
    """The model's tokenizer, with a pad token (EOS when it has none) and right padding for training.

    The vocabulary never grows: a new pad token would add an embedding row, and the saved adapter would then carry
    the whole embedding matrix and no longer load onto the plain base (what FinLoRA's Llama pad token does to
    SmolLM2 under axolotl). Padding is masked out of the loss and attention, so reusing EOS costs nothing.
    """
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise ModelSourceError(f"cannot load a tokenizer from {model_path}: {error}") from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelSourceError(
                f"the tokenizer in {model_path} has neither a pad token nor an EOS token; the runner will not add "
                f"one (a new token grows the vocabulary and the adapter would no longer fit the base). Name an "
                f'existing token as "pad_token" (or "eos_token") in {Path(model_path) / "tokenizer_config.json"}.'
            )
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def load_base_model(model_path: str, quantisation: QuantisationSettings, *, trust_remote_code: bool = False):
    """A causal LM loaded as `quantisation` says (bitsandbytes 4-bit/8-bit, or unquantised in its dtype).

    A quantised request is checked on the loaded layers: a 4-bit (8-bit) request that produced no 4-bit (8-bit)
    bitsandbytes layer is an error, never a silently unquantised base.
    """
    from transformers import AutoModelForCausalLM

    quantization_config = quantisation.bitsandbytes_config()
    # Passed only when quantising: an explicit None tells transformers 5 to load a pre-quantised checkpoint as plain
    # layers, which fails on its packed weights with a bare size-mismatch error instead of loading its own layers.
    quantising = {"quantization_config": quantization_config} if quantization_config is not None else {}
    check_weight_files(model_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            model_path,
            dtype=torch_dtype(quantisation.dtype),
            device_map=device_map_for_this_process(),
            trust_remote_code=trust_remote_code,
            **quantising,
        )
    except OSError as error:
        raise ModelSourceError(f"cannot load model weights from {model_path}: {error}") from None
    problem = quantisation_mismatch(requested_bits(quantization_config), count_quantised_layers(model))
    if problem:
        raise ModelSourceError(
            f"{model_path}: {problem}. bitsandbytes quantises torch.nn.Linear layers only; train this model "
            f"unquantised (quant_bits null) or with a base whose layers are nn.Linear."
        )
    lora.models.bnb_cpu_fixes.disable_cpu_weight_repacking(model)
    return model


def check_weight_files(model_path: str) -> None:
    """Raise when a safetensors weights file of a local model folder is truncated or corrupt (read from its header,
    before minutes of loading; the loader itself would fail with a bare library error that names no file).

    Raises:
        ModelSourceError: naming the file and how to get a whole copy.
    """
    from lora.core.files import file_problem

    folder = Path(model_path)
    for path in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
        problem = file_problem(path)
        if problem:
            raise ModelSourceError(
                f"cannot load model weights from {model_path}: {path} is damaged: {problem}. Copy or download the "
                "model again (a model converted by this project: delete the folder and run python "
                "lora/model_source.py MODEL_ID)."
            )

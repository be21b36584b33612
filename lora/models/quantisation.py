"""What a loaded model really holds: its bitsandbytes 4-bit and 8-bit layers, counted on the modules themselves.

A quantisation setting can be dropped on its way to the loader without any error (axolotl, for one, loads the base
unquantised when a YAML says `adapter: lora` next to `load_in_4bit: true`), so a quantised recipe is checked on the
loaded layers, and the run record says what was found. This module has no side effects on import (no bitsandbytes
patches), so that bench/peer_axolotl.py can count another tool's model with the same rule.
"""

from __future__ import annotations

import torch
from torch import nn

from lora.core.errors import RecipeError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The container dtype of packed 4-bit weights: uint8 by default; FSDP can only shard them in the dtype of the other
# (unquantised) parameters, e.g. bfloat16.
STORAGE_DTYPES = {"uint8": torch.uint8, **DTYPES}


def torch_dtype(name: str):
    return "auto" if name == "auto" else DTYPES[name]



def build_quantization_config(recipe):
    """`BitsAndBytesConfig` for 4-bit/8-bit recipes, None for an unquantised base."""
    from transformers import BitsAndBytesConfig

    # Callers outside the runner (eval, serve, merge) pass partial dicts read from an adapter's recipe.json.
    storage = recipe.get("bnb_4bit_quant_storage", "uint8")
    if stores_4bit_as_float(recipe) and storage != recipe.get("dtype", "float32"):
        raise RecipeError(
            f'recipe "{getattr(recipe, "name", "?")}": bnb_4bit_quant_storage is {storage} but dtype is '
            f'{recipe["dtype"]}; FSDP/ZeRO-3 can only shard a 4-bit base whose unquantised parameters have the '
            f'storage dtype: set dtype "{recipe["bnb_4bit_quant_storage"]}" (or the storage back to "uint8").'
        )
    if recipe["quant_bits"] == 4:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=recipe["bnb_4bit_quant_type"],
            bnb_4bit_use_double_quant=recipe["bnb_4bit_use_double_quant"],
            bnb_4bit_compute_dtype=DTYPES[recipe["bnb_4bit_compute_dtype"]],
            bnb_4bit_quant_storage=STORAGE_DTYPES[storage],
        )
    if recipe["quant_bits"] == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=recipe["llm_int8_threshold"])
    return None


def stores_4bit_as_float(recipe) -> bool:
    """A 4-bit base whose packed weights live in a float dtype: the layout FSDP and ZeRO-3 can shard.

    Sharding flattens the parameters of a block into one tensor of a single dtype, so such a base keeps every
    unquantised parameter in the recipe's `dtype` (equal to the storage dtype) instead of peft's float32 upcast.
    """
    return recipe["quant_bits"] == 4 and recipe.get("bnb_4bit_quant_storage", "uint8") != "uint8"


def count_quantised_layers(model: nn.Module) -> dict:
    """Counts of bitsandbytes 4-bit and 8-bit linear layers and of plain `nn.Linear` layers in `model`.

    Returns:
        {"bits": 4, 8 or None (the kind found; 4 when both are present), "linear4bit": n, "linear8bit": n,
        "plain_linear": n, "quant_type": e.g. "nf4" (4-bit only, else None)}. A peft-wrapped model counts its base
        layers (peft's wrappers are not bitsandbytes subclasses).
    """
    import bitsandbytes as bnb

    four = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    eight = [m for m in model.modules() if isinstance(m, bnb.nn.Linear8bitLt)]
    # bnb's layers subclass nn.Linear: count the plain ones apart.
    plain = [m for m in model.modules() if type(m) is nn.Linear]
    quant_types = sorted({getattr(m.weight, "quant_type", None) or "?" for m in four})
    return {
        "bits": 4 if four else 8 if eight else None,
        "linear4bit": len(four),
        "linear8bit": len(eight),
        "plain_linear": len(plain),
        "quant_type": ",".join(quant_types) if quant_types else None,
    }


def requested_bits(quantization_config) -> int | None:
    """4 or 8 for a `BitsAndBytesConfig` that asks for them, None for no quantisation."""
    if quantization_config is None:
        return None
    if getattr(quantization_config, "load_in_4bit", False):
        return 4
    if getattr(quantization_config, "load_in_8bit", False):
        return 8
    return None


def quantisation_mismatch(expected_bits: int | None, counts: dict) -> str | None:
    """Why the loaded layers do not match `expected_bits` (None when they do, or when no quantisation was asked).

    A 4-bit request must yield 4-bit layers and no 8-bit ones, and the reverse; an unquantised request is not
    checked here (a pre-quantised checkpoint may legitimately carry its own layers).
    """
    if expected_bits is None:
        return None
    wanted, other = ("linear4bit", "linear8bit") if expected_bits == 4 else ("linear8bit", "linear4bit")
    if counts[wanted] and not counts[other]:
        return None
    return (f"asked for a {expected_bits}-bit base but the loaded model has {counts['linear4bit']} 4-bit, "
            f"{counts['linear8bit']} 8-bit and {counts['plain_linear']} unquantised linear layers")

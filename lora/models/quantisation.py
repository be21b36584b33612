"""What a loaded model really holds: its bitsandbytes 4-bit and 8-bit layers, counted on the modules themselves.

A quantisation setting can be dropped on its way to the loader without any error (axolotl, for one, loads the base
unquantised when a YAML says `adapter: lora` next to `load_in_4bit: true`), so a quantised recipe is checked on the
loaded layers, and the run record says what was found. This module has no side effects on import (no bitsandbytes
patches), so that bench/peer_axolotl.py can count another tool's model with the same rule.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from lora.core.compute_dtype import AUTO, choose_dtype
from lora.core.errors import RecipeError

# Recipe fields -> QuantisationSettings attributes, and which width each configures: declared in the recipes part,
# whose registry checks a recipe with the same list (4-bit options next to quant_bits 8 are errors).
from lora.recipes.quantisation_fields import SETTINGS_FIELDS

__all__ = [
    "count_quantised_layers",
    "DTYPES",
    "quantisation_mismatch",
    "QuantisationSettings",
    "requested_bits",
    "schema_defaults",
    "SETTINGS_FIELDS",
    "STORAGE_DTYPES",
    "torch_dtype",
]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The container dtype of packed 4-bit weights: uint8 by default; FSDP can only shard them in the dtype of the other
# (unquantised) parameters, e.g. bfloat16.
STORAGE_DTYPES = {"uint8": torch.uint8, **DTYPES}


def torch_dtype(name: str):
    return "auto" if name == "auto" else DTYPES[name]


@dataclass(frozen=True)
class QuantisationSettings:
    """How a base model is loaded: the one object training, evaluation, serving, merge and normalisation build a
    base from, so that an adapter always meets the base it was trained on.

    Built from a resolved recipe or from an adapter's saved recipe.json (`from_recipe`); a field a record lacks
    takes the recipe schema's default, the same default training would have used.
    """

    bits: int | None  # 4 or 8 through bitsandbytes; None: unquantised
    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: str = "bfloat16"
    storage: str = "uint8"  # container dtype of packed 4-bit weights
    int8_threshold: float = 6.0
    dtype: str = "float32"  # the unquantised parameters (the whole model when bits is None)

    @classmethod
    def from_recipe(cls, recipe: Mapping[str, Any]) -> QuantisationSettings:
        """From a resolved `Recipe` or a recipe.json dict; missing fields take the schema's defaults."""
        defaults = schema_defaults()
        values = {}
        for field_name, attribute in SETTINGS_FIELDS.items():
            value = recipe.get(field_name, defaults.get(field_name))
            values[attribute] = value if value is not None or field_name == "quant_bits" else defaults[field_name]
        values["bits"] = values["bits"] if values["bits"] in (4, 8) else None
        for attribute in ("compute_dtype", "dtype"):
            if values[attribute] == AUTO:  # a hand-written record; a resolved recipe holds the chosen dtype
                values[attribute] = choose_dtype()[0]
        settings = cls(**values)
        if settings.stores_4bit_as_float and settings.storage != settings.dtype:
            raise RecipeError(
                f'recipe "{getattr(recipe, "name", "?")}": bnb_4bit_quant_storage is {settings.storage} but dtype is '
                f'{settings.dtype}; FSDP/ZeRO-3 can only shard a 4-bit base whose unquantised parameters have the '
                f'storage dtype: set dtype "{settings.storage}" (or the storage back to "uint8").'
            )
        return settings

    @classmethod
    def unquantised(cls, dtype: str = "float32") -> QuantisationSettings:
        return cls(bits=None, dtype=dtype)

    def with_bits(self, bits: int | None) -> QuantisationSettings:
        """The same settings at another width (a --quant-bits flag): 4-bit keeps the recorded quant type,
        double quantisation and compute dtype."""
        return replace(self, bits=bits if bits in (4, 8) else None)

    @property
    def stores_4bit_as_float(self) -> bool:
        """A 4-bit base whose packed weights live in a float dtype: the layout FSDP and ZeRO-3 can shard.

        Sharding flattens the parameters of a block into one tensor of a single dtype, so such a base keeps every
        unquantised parameter in `dtype` (equal to the storage dtype) instead of peft's float32 upcast.
        """
        return self.bits == 4 and self.storage != "uint8"

    def bitsandbytes_config(self):
        """`BitsAndBytesConfig` for 4-bit/8-bit settings, None for an unquantised base."""
        from transformers import BitsAndBytesConfig

        if self.bits == 4:
            return BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type=self.quant_type,
                bnb_4bit_use_double_quant=self.double_quant,
                bnb_4bit_compute_dtype=DTYPES[self.compute_dtype],
                bnb_4bit_quant_storage=STORAGE_DTYPES[self.storage],
            )
        if self.bits == 8:
            return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=self.int8_threshold)
        return None

    def describe(self) -> str:
        """One line for logs and records: e.g. "4-bit nf4, double quantisation, bfloat16 compute"."""
        if self.bits == 4:
            double = "double quantisation" if self.double_quant else "no double quantisation"
            return (f"4-bit {self.quant_type}, {double}"
                    f", {self.compute_dtype} compute")
        if self.bits == 8:
            return f"8-bit, int8 threshold {self.int8_threshold:g}"
        return f"unquantised, {self.dtype}"


def schema_defaults() -> dict[str, Any]:
    """The recipe schema's default of every quantisation field."""
    from lora.recipes.registry import load_schema

    properties = load_schema()["properties"]
    return {field_name: properties[field_name].get("default") for field_name in SETTINGS_FIELDS}


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

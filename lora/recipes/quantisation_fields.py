"""The recipe fields of quantisation: which ones configure a 4-bit base, which an 8-bit one, and which
`QuantisationSettings` attribute each one sets.

The quantisation rule itself is lora/models/quantisation.py (QuantisationSettings builds every base from these
fields); the list lives here, in the recipes part, because the registry's check that a 4-bit option next to
quant_bits 8 (or the reverse) is an error must read the same list, and lora.recipes comes before lora.models in the
import order. A new bitsandbytes option is one line here (and its schema entry in recipe_schema.json);
tests/test_quantisation_fields.py fails when a schema field named like a bitsandbytes option is missing here.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

__all__ = ["EIGHT_BIT_FIELDS", "FOUR_BIT_FIELDS", "SETTINGS_FIELDS", "other_width_problems"]

# Recipe field -> QuantisationSettings attribute, by the width the field configures. The names are
# BitsAndBytesConfig's own (bnb_4bit_*, llm_int8_*).
FOUR_BIT_FIELDS = {
    "bnb_4bit_quant_type": "quant_type",
    "bnb_4bit_use_double_quant": "double_quant",
    "bnb_4bit_compute_dtype": "compute_dtype",
    "bnb_4bit_quant_storage": "storage",
}
EIGHT_BIT_FIELDS = {
    "llm_int8_threshold": "int8_threshold",
}
# Every recipe field a base is loaded from (finetune_configs.json, recipe.json) -> QuantisationSettings attribute.
SETTINGS_FIELDS = {"quant_bits": "bits", **FOUR_BIT_FIELDS, **EIGHT_BIT_FIELDS, "dtype": "dtype"}


def other_width_problems(bits: Any, fields_set: Iterable[str]) -> list[str]:
    """A 4-bit option set next to a quant_bits other than 4, or an 8-bit option next to one other than 8.

    Args:
        bits: the recipe's quant_bits as written (4, 8, 16, 32, "none" or None).
        fields_set: the fields set where quant_bits was chosen or later (a recipe that extends a 4-bit recipe and
            sets quant_bits 8 inherits 4-bit options that simply no longer apply).
    """
    fields_set = set(fields_set)
    problems = []
    if bits != 4:
        problems += [f'field "{key}" is a 4-bit option but quant_bits is {json.dumps(bits)} (set quant_bits 4)'
                     for key in sorted(fields_set.intersection(FOUR_BIT_FIELDS))]
    if bits != 8:
        problems += [f'field "{key}" is an 8-bit option but quant_bits is {json.dumps(bits)} (set quant_bits 8)'
                     for key in sorted(fields_set.intersection(EIGHT_BIT_FIELDS))]
    return problems

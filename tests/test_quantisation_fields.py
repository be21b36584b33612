"""One list of quantisation fields (lora/recipes/quantisation_fields.py): the registry's check and QuantisationSettings
read the same one. The 4-bit and 8-bit fields are found in the schema itself (bitsandbytes' own names), so a new
schema field that the list misses fails here rather than being quietly accepted next to the other width."""

from __future__ import annotations

import dataclasses
import inspect
import json

import pytest
from transformers import BitsAndBytesConfig

from lora.core.errors import RecipeError
from lora.models.quantisation import QuantisationSettings
from lora.recipes.quantisation_fields import EIGHT_BIT_FIELDS, FOUR_BIT_FIELDS, SETTINGS_FIELDS
from lora.recipes.registry import load_schema, resolve_recipe

PROPERTIES = load_schema()["properties"]
# Fields of the schema that configure one width, by the names BitsAndBytesConfig gives its options.
SCHEMA_WIDTH_FIELDS = {4: sorted(key for key in PROPERTIES if key.startswith("bnb_4bit_")),
                       8: sorted(key for key in PROPERTIES if key.startswith("llm_int8_"))}
CASES = [(key, 4, 8) for key in SCHEMA_WIDTH_FIELDS[4]] + [(key, 8, 4) for key in SCHEMA_WIDTH_FIELDS[8]]


def _registry(tmp_path):
    path = tmp_path / "finetune_configs.json"
    path.write_text(json.dumps({"r": {"base_model": "m", "dataset_path": "d.jsonl"}}))
    return path


@pytest.mark.parametrize(("key", "width", "other"), CASES)
def test_every_width_field_of_the_schema_is_refused_next_to_the_other_width(tmp_path, key, width, other):
    value = json.dumps(PROPERTIES[key]["default"])
    with pytest.raises(RecipeError) as caught:
        resolve_recipe("r", _registry(tmp_path), [f"quant_bits={other}", f"{key}={value}"])
    kind = "a 4-bit" if width == 4 else "an 8-bit"
    assert f'field "{key}" is {kind} option but quant_bits is {other} (set quant_bits {width})' in str(caught.value)
    assert resolve_recipe("r", _registry(tmp_path), [f"quant_bits={width}", f"{key}={value}"])[key] is not None


def test_eight_bit_with_a_4bit_storage_dtype_is_refused(tmp_path):
    """The case that slipped through when the registry kept its own, shorter list."""
    with pytest.raises(RecipeError, match='"bnb_4bit_quant_storage" is a 4-bit option but quant_bits is 8'):
        resolve_recipe("r", _registry(tmp_path), ["quant_bits=8", "bnb_4bit_quant_storage=bfloat16"])


def test_the_one_list_covers_the_schema_bitsandbytes_and_the_settings():
    assert sorted(FOUR_BIT_FIELDS) == SCHEMA_WIDTH_FIELDS[4]
    assert sorted(EIGHT_BIT_FIELDS) == SCHEMA_WIDTH_FIELDS[8]
    bnb_options = set(inspect.signature(BitsAndBytesConfig.__init__).parameters)
    assert set(FOUR_BIT_FIELDS) | set(EIGHT_BIT_FIELDS) <= bnb_options
    assert set(SETTINGS_FIELDS) <= set(PROPERTIES)
    assert sorted(SETTINGS_FIELDS.values()) == sorted(f.name for f in dataclasses.fields(QuantisationSettings))

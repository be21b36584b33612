"""The table of trainers: its two halves (rules for the registry, builders for a run) name the same trainers as the
schema's `trainer` enum, every field a trainer owns is a schema field, and a field of one trainer set in another's
recipe is refused, for every pair of trainers the table holds (so a new entry is checked without a new test)."""

from __future__ import annotations

import importlib
import json

import pytest

from lora.core.errors import RecipeError
from lora.recipes.registry import load_schema, resolve_recipe
from lora.recipes.trainers import TRAINERS
from lora.training.trainers import BUILDER_FUNCTIONS, BUILDERS, trainer_module


def test_rules_builders_and_schema_name_the_same_trainers():
    assert list(TRAINERS) == list(BUILDERS)
    assert load_schema()["properties"]["trainer"]["enum"] == list(TRAINERS)
    assert all(name == rules.name for name, rules in TRAINERS.items())


def test_every_trainer_field_is_a_schema_field():
    properties = load_schema()["properties"]
    for rules in TRAINERS.values():
        assert set(rules.fields) <= set(properties), rules.name


@pytest.mark.parametrize("name", list(BUILDERS))
def test_each_builder_is_one_training_module_with_the_table_functions(name):
    assert BUILDERS[name].startswith("lora.training.")  # the import order: a builder lives in the training part
    module = trainer_module(name)
    assert module is importlib.import_module(BUILDERS[name])
    for function in BUILDER_FUNCTIONS:
        assert function in module.__all__ and callable(getattr(module, function))


def _a_value_that_turns_it_on(spec: dict):
    """A valid, non-empty value for a schema property: a field set to it matters to whichever trainer reads it."""
    if spec.get("default"):
        return spec["default"]
    if "enum" in spec:
        return next(value for value in spec["enum"] if value is not None)
    types = spec.get("type")
    types = types if isinstance(types, list) else [types]
    if "boolean" in types:
        return True
    if "integer" in types:
        return max(1, spec.get("minimum", 1))
    if "number" in types:
        return 0.1
    if "string" in types:
        return "other.jsonl"
    if "array" in types:
        return [1.0] if spec.get("items", {}).get("type") == "number" else ["exact_match"]
    raise AssertionError(f"no example value for {spec}")


CASES = [(trainer, key) for trainer in TRAINERS for other in TRAINERS.values() for key in other.fields
         if key not in TRAINERS[trainer].fields]


@pytest.mark.parametrize(("trainer", "key"), CASES)
def test_a_field_of_another_trainer_is_refused(tmp_path, trainer, key):
    value = _a_value_that_turns_it_on(load_schema()["properties"][key])
    registry = tmp_path / "finetune_configs.json"
    registry.write_text(json.dumps({"r": {"base_model": "m", "dataset_path": "d.jsonl", "trainer": trainer,
                                          key: value}}))
    with pytest.raises(RecipeError) as caught:
        resolve_recipe("r", registry)
    accepting = [name for name, rules in TRAINERS.items() if key in rules.fields]
    assert f'field "{key}"' in str(caught.value)
    assert any(name in str(caught.value) for name in accepting)


def test_sft_fields_off_in_a_shared_base_do_not_stop_a_grpo_recipe(tmp_path):
    registry = tmp_path / "finetune_configs.json"
    registry.write_text(json.dumps({
        "_base": {"base_model": "m", "dataset_path": "d.jsonl", "packing": False, "validation_split": 0},
        "rl": {"extends": "_base", "trainer": "grpo", "reward_functions": ["exact_match"]},
    }))
    assert resolve_recipe("rl", registry)["trainer"] == "grpo"


def test_the_schema_loss_types_are_exactly_the_trainers_own():
    from lora.recipes.registry import load_schema
    from lora.recipes.trainers import DPO_LOSS_TYPES, GRPO_LOSS_TYPES

    enum = load_schema()["properties"]["loss_type"]["enum"]
    assert set(enum) == {*GRPO_LOSS_TYPES, *DPO_LOSS_TYPES, None}
    assert len(enum) == len(GRPO_LOSS_TYPES) + len(DPO_LOSS_TYPES) + 1

"""One quantisation rule: the base an adapter is scored, served and normalised on is the base it was trained on.

A recipe with non-default 4-bit settings (fp4, double quantisation on, float32 compute where the schema says
bfloat16) is trained; the evaluator, the server (with --quant-bits 4, as a user starts it) and the DoRA normaliser
must then hold bit-identical dequantised base weights. Before QuantisationSettings the server fell back to
bitsandbytes' own 4-bit defaults (nf4, no double quantisation), and the normaliser defaulted double quantisation off.
"""

from __future__ import annotations

import argparse
import ast
import json

import bitsandbytes as bnb
import pytest
import torch

from conftest import REPO_ROOT
from eval.harness.model_plan import load_model, model_plan
from lora.adapters.folders import read_adapter_records
from lora.adapters.inference import load_base_for_adapter, quantisation_for_adapter
from lora.adapters.normalise import w0_quantisation
from lora.models.quantisation import QuantisationSettings
from lora.recipes.registry import resolve_recipe
from lora.serving.app import served_quantisation
from lora.serving.host import build_host
from lora.training.run import run_recipe

UNUSUAL_4BIT = {"quant_bits": 4, "bnb_4bit_quant_type": "fp4", "bnb_4bit_use_double_quant": True,
                "bnb_4bit_compute_dtype": "float32"}


def _registry(tmp_path, tiny_model_dir):
    recipe = {"base_model": str(tiny_model_dir), "dataset_path": str(REPO_ROOT / "data/train/sentiment_train.jsonl"),
              "use_dora": True, "max_train_examples": 8, "max_steps": 1, "batch_size": 4, "lora_r": 4,
              "lora_alpha": 8, "lora_dropout": 0.0, "max_seq_length": 48, "logging_steps": 1, "dtype": "float32",
              **UNUSUAL_4BIT}
    path = tmp_path / "finetune_configs.json"
    path.write_text(json.dumps({"tiny_fp4_double": recipe}))
    return path


def dequantised_base_weights(model) -> dict[str, torch.Tensor]:
    """Every 4-bit layer's weight as the forward pass sees it, keyed by its name in the base model."""
    weights = {}
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            key = name[name.index("layers."):].replace(".base_layer", "")  # the same layer with or without peft
            weights[key] = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
    return weights


def assert_same_weights(loaded: dict[str, torch.Tensor], trained: dict[str, torch.Tensor], who: str) -> None:
    assert loaded.keys() == trained.keys() and trained, who
    differing = [name for name in trained if not torch.equal(loaded[name], trained[name])]
    assert not differing, f"{who}: {len(differing)} of {len(trained)} 4-bit layers differ from training's"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    tmp_path = tmp_path_factory.mktemp("unusual_4bit")
    recipe = resolve_recipe("tiny_fp4_double", _registry(tmp_path, tiny_model_dir))
    result = run_recipe(recipe, tmp_path / "adapter", scoring=None)
    return tmp_path / "adapter", dequantised_base_weights(result.model)


def test_the_evaluator_loads_the_trained_base(trained):
    adapter, weights = trained
    for flag in (None, "4"):  # as recorded, and with --quant-bits 4 spelled out
        args = argparse.Namespace(recipe=None, adapter=str(adapter), base_model=None, base_only=False, out=None,
                                  registry=None)
        model, _ = load_model(model_plan(args), flag)
        assert_same_weights(dequantised_base_weights(model), weights, f"eval --quant-bits {flag}")


def test_the_server_started_with_quant_bits_4_loads_the_trained_base(trained):
    adapter, weights = trained
    quantisation = served_quantisation([("sentiment", adapter)], 4, "float32")
    host = build_host("tiny", base_path=str(read_adapter_records(adapter).base_model), quantisation=quantisation)
    assert_same_weights(dequantised_base_weights(host.model), weights, "serve --quant-bits 4")


def test_the_normaliser_dequantises_the_trained_base(trained):
    adapter, weights = trained
    quantisation = w0_quantisation(read_adapter_records(adapter), "nf4")
    base = load_base_for_adapter(adapter, quantisation=quantisation)
    assert_same_weights(dequantised_base_weights(base.model), weights, "normalize_dora --w0 nf4")


def test_a_record_without_quantisation_fields_gets_the_recipe_defaults(tmp_path, tiny_model_dir):
    registry = tmp_path / "finetune_configs.json"
    registry.write_text(json.dumps({"plain": {"base_model": str(tiny_model_dir), "dataset_path": "x.jsonl"}}))
    from_schema = QuantisationSettings.from_recipe(resolve_recipe("plain", registry))
    assert QuantisationSettings.from_recipe({"quant_bits": 4}) == from_schema
    assert from_schema.bits == 4 and from_schema.double_quant is True and from_schema.quant_type == "nf4"


def test_an_adapter_without_a_recipe_record_loads_on_an_unquantised_base_unless_asked(trained, tmp_path):
    adapter, _ = trained
    records = read_adapter_records(adapter)
    assert quantisation_for_adapter(records) == QuantisationSettings.from_recipe({**records.recipe})
    foreign = type(records)(records.adapter_dir, records.adapter_config, None, records.is_dora, False)
    assert quantisation_for_adapter(foreign).bits is None
    assert quantisation_for_adapter(foreign, bits=4) == QuantisationSettings.from_recipe({"quant_bits": 4})


def test_bitsandbytes_configs_are_built_in_one_place():
    builders = []
    for path in sorted((REPO_ROOT / "lora").rglob("*.py")) + sorted((REPO_ROOT / "eval").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) == \
                    "BitsAndBytesConfig":
                builders.append(str(path.relative_to(REPO_ROOT)))
    assert set(builders) == {"lora/models/quantisation.py"}, builders

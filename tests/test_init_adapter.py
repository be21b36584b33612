"""Recipes that start from a trained adapter (init_adapter): exact weights, mismatches refused, GRPO after SFT."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from peft import get_peft_model_state_dict
from safetensors.torch import load_file

from conftest import REPO_ROOT, bnb_defaults
from lora.adapters.attach import attach_adapter
from lora.finetune import harness_scoring, main
from lora.models.loading import load_base_model
from lora.prompts.rewards import Sample, register_reward
from lora.recipes.registry import resolve_recipe
from lora.training.run import run_recipe

SENTIMENT = str(REPO_ROOT / "data/train/sentiment_train.jsonl")
EXPECTED_FILES = {
    "README.md", "adapter_config.json", "adapter_model.safetensors", "chat_template.jinja", "loss_curve.png",
    "recipe.json", "run_summary.json", "tokenizer.json", "tokenizer_config.json", "trainer_state.json",
}


@register_reward("test_answer_length")
def answer_length(sample: Sample) -> float:
    """Any reward that differs between sampled answers will do: these tests are about where training starts."""
    return float(len(sample.token_ids))


@pytest.fixture(scope="module")
def registry(tmp_path_factory, tiny_model_dir):
    folder = tmp_path_factory.mktemp("init-adapter")
    dora = {"base_model": str(tiny_model_dir), "dataset_path": SENTIMENT, "quant_bits": 4,
            "bnb_4bit_compute_dtype": "float32", "use_dora": True, "lora_r": 4, "lora_alpha": 8,
            "lora_dropout": 0.0, "max_steps": 2, "batch_size": 4, "logging_steps": 1}
    recipes = {
        "start": dora,
        "continue": {**dora, "init_adapter": "adapters/start"},  # relative to the registry's folder
        "grpo_after": {**dora, "init_adapter": "adapters/start", "trainer": "grpo",
                       "reward_functions": ["test_answer_length"], "num_generations": 2, "max_completion_length": 3,
                       "kl_beta": 0.1, "learning_rate": 0.01},
        "wrong_rank": {**dora, "init_adapter": "adapters/start", "lora_r": 8, "use_dora": False},
        "missing": {**dora, "init_adapter": "adapters/nothing-here"},
        "needs_start": {**dora, "init_adapter": "outputs/start"},  # the output folder of a recipe not yet run
        "normalised": {**dora, "init_adapter": "adapters/normalised"},
        "broken_config": {**dora, "init_adapter": "adapters/broken"},
    }
    path = folder / "finetune_configs.json"
    path.write_text(json.dumps(recipes, indent=2))
    return path


@pytest.fixture(scope="module")
def start_adapter(registry):
    """A DoRA adapter far from the base (random B and magnitudes), saved as the runner saves one."""
    recipe = resolve_recipe("start", registry)
    model = attach_adapter(recipe, load_base_model(recipe["base_model"], bnb_defaults(4)))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "lora_magnitude_vector" in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.5)
    folder = registry.parent / "adapters" / "start"
    model.save_pretrained(folder)
    # Two unusable copies: one marked as a runtime export (magnitudes divided by the norm), one with a broken config.
    for name, edit in (("normalised", lambda text: text.replace("{", '{"dora_magnitudes_normalised": true, ', 1)),
                       ("broken", lambda text: text[: len(text) // 2])):
        copy = shutil.copytree(folder, folder.parent / name)
        (copy / "adapter_config.json").write_text(edit((folder / "adapter_config.json").read_text()))
    return folder


def adapter_tensors(model, adapter: str = "default") -> dict[str, torch.Tensor]:
    """One adapter's tensors, keyed as adapter_model.safetensors keys them (peft's own mapping)."""
    state = get_peft_model_state_dict(model, adapter_name=adapter)
    return {name: tensor.detach().clone() for name, tensor in state.items()}


def test_recipe_loads_every_weight_of_the_adapter_exactly(registry, start_adapter):
    recipe = resolve_recipe("continue", registry)
    assert recipe["init_adapter"] == str(start_adapter)  # resolved against the registry, not the working directory
    model = attach_adapter(recipe, load_base_model(recipe["base_model"], bnb_defaults(4)))
    saved = load_file(start_adapter / "adapter_model.safetensors")
    loaded = adapter_tensors(model)
    assert loaded.keys() == saved.keys() and len(saved) > 0
    for name, tensor in saved.items():
        torch.testing.assert_close(loaded[name], tensor, rtol=0, atol=0, msg=name)
    assert all(p.requires_grad for name, p in model.named_parameters() if "lora_" in name)  # and trains them
    tokens = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad(), model.disable_adapter():
        base_logits = model(tokens).logits
    with torch.no_grad():
        start_logits = model(tokens).logits
    assert (start_logits - base_logits).abs().max() > 1e-2  # far from the base: the GRPO test's KL check can fail


@pytest.mark.parametrize(("recipe_name", "fragments"), [
    ("wrong_rank", ['"lora_r" is 8 but the adapter has r=4 (set "lora_r": 4)',
                    '"use_dora" is False but the adapter has use_dora=True (set "use_dora": true)']),
    ("missing", ['field "init_adapter"', "adapters/nothing-here", "is not a finished adapter folder"]),
    ("needs_start", ["outputs/start", "train it first: python lora/finetune.py start"]),
    ("normalised", ["adapters/normalised", "is a NORMALISED DoRA adapter"]),
    ("broken_config", ["adapters/broken", "adapter_config.json:", "is not valid JSON"]),
])
def test_mismatched_or_missing_adapter_exits_2_before_anything_is_written(registry, start_adapter, tmp_path, capsys,
                                                                          recipe_name, fragments):
    out = tmp_path / "out"
    assert main([recipe_name, "--registry", str(registry), "--output-dir", str(out)]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f'error: recipe "{recipe_name}"') and "Traceback" not in error
    for fragment in fragments:
        assert fragment in error
    assert not out.exists()


def test_grpo_from_a_trained_adapter_uses_it_as_start_and_reference(registry, start_adapter, tmp_path):
    recipe = resolve_recipe("grpo_after", registry)
    out = tmp_path / "grpo"
    result = run_recipe(recipe, out, scoring=harness_scoring())
    model = result.model

    # TRL keeps a frozen copy of the starting adapter ("ref") as the KL reference: the start, not the base.
    assert set(model.peft_config) == {"default", "ref"}
    saved_start = load_file(start_adapter / "adapter_model.safetensors")
    reference = adapter_tensors(model, "ref")
    for name, tensor in saved_start.items():
        torch.testing.assert_close(reference[name], tensor, rtol=0, atol=0, msg=name)
    assert not any(p.requires_grad for name, p in model.named_parameters() if ".ref." in name)

    history = json.loads((out / "run_summary.json").read_text())
    kl = [entry["kl"] for entry in history["rewards"]["reward_history"]]
    assert kl[0] < 1e-6, kl  # the first step's policy is the reference exactly
    assert history["init_adapter_sha256"] and history["status"] == "completed"

    # The published adapter is the trained "default" alone: no ref/ folder beside it, and it moved from the start.
    assert {p.name for p in out.iterdir()} == EXPECTED_FILES
    trained = load_file(out / "adapter_model.safetensors")
    assert trained.keys() == saved_start.keys()
    assert any(not torch.equal(trained[name], saved_start[name]) for name in trained)

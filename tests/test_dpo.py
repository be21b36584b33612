"""DPO recipes: preference rows encoded by the shared rule, the dpo recipe fields, and real DPO runs on the tiny model
(4-bit DoRA with fast DoRA, 8-bit LoRA, unquantised LoRA) whose held-out preference accuracy rises."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import REPO_ROOT
from lora.core.errors import DataError, RecipeError
from lora.models.loading import load_tokenizer
from lora.prompts.data_formats import read_data_file
from lora.prompts.templates import encode_completion
from lora.recipes.registry import resolve_recipe
from lora.training.dpo import encode_preference, load_training_data, preference_accuracy
from lora.training.run import run_recipe

SENTIMENT_PAIRS = REPO_ROOT / "data/preference/sentiment_train.jsonl"
SENTIMENT_HELD_OUT = REPO_ROOT / "data/preference/sentiment_test.jsonl"


def write_registry(folder, recipes):
    path = folder / "finetune_configs.json"
    path.write_text(json.dumps(recipes, indent=2))
    return path


def write_rows(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_a_preference_pair_encodes_like_the_rows_the_harness_scores(tiny_model_dir):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    row = read_data_file(SENTIMENT_PAIRS).rows[0]
    assert set(row) == {"prompt", "chosen", "rejected"}  # FinLoRA's "context" read as the prompt
    encoded = encode_preference(row, "plain", tokenizer, 512)
    for side in ("chosen", "rejected"):
        pair = encode_completion(row["prompt"], row[side], "plain", tokenizer)
        assert encoded["prompt_ids"] + encoded[f"{side}_ids"] == pair.input_ids
    conversational = {"prompt": [{"role": "user", "content": "Sentiment?"}],
                      "chosen": [{"role": "assistant", "content": "positive"}],
                      "rejected": [{"role": "assistant", "content": "negative"}]}
    encoded = encode_preference(conversational, "plain", tokenizer, 512)
    whole = encode_completion(conversational["prompt"], "positive", "chat", tokenizer)
    assert encoded["prompt_ids"] + encoded["chosen_ids"] == whole.input_ids
    assert tokenizer.decode(encoded["chosen_ids"]).endswith("</s>")  # the chat template's end of turn


@pytest.mark.parametrize(("row", "message"), [
    ({"prompt": "p", "chosen": "a"}, 'missing "rejected"'),
    ({"prompt": "p", "chosen": "a", "rejected": "a"}, '"chosen" and "rejected" are the same'),
    ({"prompt": "p", "context": "p", "chosen": "a", "rejected": "b"}, 'not both'),
    ({"prompt": "p", "chosen": 3, "rejected": "b"}, '"chosen" must be a string or a list'),
    ({"prompt": [{"role": "user", "content": "p"}], "chosen": "a", "rejected": "b"}, "not a mix"),
    ({"prompt": "p", "chosen": " ", "rejected": "b"}, '"chosen" is empty'),
])
def test_bad_preference_rows_name_file_and_line(tmp_path, row, message):
    good = {"prompt": "p", "chosen": "a", "rejected": "b"}
    path = write_rows(tmp_path / "pairs.jsonl", [good, row])
    with pytest.raises(DataError) as caught:
        read_data_file(path)
    assert f"{path}:2" in str(caught.value) and message in str(caught.value)


def test_dpo_recipe_fields_are_checked(tmp_path):
    base = {"base_model": "m", "dataset_path": "d.jsonl", "trainer": "dpo"}
    registry = write_registry(tmp_path, {
        "bad_loss": {**base, "loss_type": "sigmoidd"},
        "bad_beta": {**base, "beta": 0},
        "beta_in_sft": {**base, "trainer": "sft", "beta": 0.2},
        "chat_format": {"base_model": "m", "trainer": "dpo", "datasets": [{"path": "d.jsonl", "format": "messages"}],
                        "prompt_template": "chat"},
    })
    for name, fragment in [("bad_loss", 'nearest: "sigmoid"'), ("bad_beta", 'field "beta"'),
                           ("beta_in_sft", 'field "beta" only applies to dpo'),
                           ("chat_format", 'a dpo recipe trains on preference rows')]:
        with pytest.raises(RecipeError) as caught:
            resolve_recipe(name, registry)
        assert fragment in str(caught.value), name


def test_a_dpo_recipe_on_supervised_rows_exits_2_naming_the_file(tmp_path, tiny_model_dir, capsys):
    from lora.finetune import main

    registry = write_registry(tmp_path, {"r": {"base_model": str(tiny_model_dir), "trainer": "dpo", "quant_bits": None,
                                               "dataset_path": str(REPO_ROOT / "data/train/sentiment_train.jsonl")}})
    assert main(["r", "--registry", str(registry), "--output-dir", str(tmp_path / "out")]) == 2
    assert "sentiment_train.jsonl: holds finlora rows" in capsys.readouterr().err


def toy_pairs(count: int, seed: int) -> list[dict]:
    """Pairs the tiny model can learn in a few steps: the prompt's last word decides which label is chosen."""
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        good = rng.random() < 0.5
        subject = rng.choice(["revenue", "margin", "income", "EBITDA", "dividend"])
        prompt = f"Input: The {subject} {'rose' if good else 'cut'}.\nAnswer: "
        chosen, rejected = ("positive", "negative") if good else ("negative", "positive")
        rows.append({"context": prompt, "chosen": chosen, "rejected": rejected})
    return rows


TINY = {"lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "learning_rate": 0.01, "lr_scheduler_type": "constant",
        "warmup_steps": 0, "logging_steps": 1, "batch_size": 8, "max_steps": 16, "trainer": "dpo", "beta": 0.5}


@pytest.mark.slow
@pytest.mark.parametrize("variant", [
    {"quant_bits": 4, "bnb_4bit_compute_dtype": "float32", "use_dora": True},  # fast DoRA (the default)
    {"quant_bits": 8, "use_dora": False},
    {"quant_bits": None, "use_dora": True, "fast_dora": False},  # stock peft DoRA
])
def test_dpo_raises_held_out_preference_accuracy(tmp_path, tiny_model_dir, variant):
    train = write_rows(tmp_path / "pairs.jsonl", toy_pairs(96, seed=1))
    held_out = write_rows(tmp_path / "held_out.jsonl", toy_pairs(40, seed=2))
    registry = write_registry(tmp_path, {"d": {"base_model": str(tiny_model_dir), **TINY, **variant,
                                               "datasets": [{"path": str(train), "max_examples": 64}],
                                               "validation_path": str(held_out)}})
    recipe = resolve_recipe("d", registry)
    result = run_recipe(recipe, tmp_path / "out", scoring=None)
    summary = json.loads((tmp_path / "out" / "run_summary.json").read_text())
    preferences = summary["preferences"]
    assert summary["status"] == "completed" and summary["steps"] == 16
    assert summary["first_loss"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference (the base) at the start
    assert list(result.model.peft_config) == ["default"]  # reference = base with the adapter off: no copy kept
    assert {p.dtype for p in result.model.parameters() if p.requires_grad} == {torch.float32}
    assert preferences["held_out_pairs"] == 40
    assert preferences["held_out_accuracy_after"] > preferences["held_out_accuracy_before"] + 0.2, preferences
    assert summary["datasets"][0]["rows_used"] == 64 and summary["datasets"][0]["rows_read"] == 96
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_sft_then_dpo_from_init_adapter_starts_from_and_is_referenced_to_the_sft_adapter(tmp_path, tiny_model_dir):
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    pairs = toy_pairs(64, seed=1)
    supervised = write_rows(tmp_path / "sft.jsonl", [{"context": row["context"], "target": row["chosen"]}
                                                      for row in pairs])
    train = write_rows(tmp_path / "pairs.jsonl", pairs)
    held_out = write_rows(tmp_path / "held_out.jsonl", toy_pairs(40, seed=2))
    common = {"base_model": str(tiny_model_dir), "quant_bits": None, "lora_r": 8, "lora_alpha": 16,
              "lora_dropout": 0.0, "lr_scheduler_type": "constant", "warmup_steps": 0, "logging_steps": 1,
              "batch_size": 8, "learning_rate": 0.01}
    registry = write_registry(tmp_path, {
        "sft": {**common, "dataset_path": str(supervised), "max_steps": 8},
        "dpo": {**common, "trainer": "dpo", "beta": 0.5, "max_steps": 8, "dataset_path": str(train),
                "validation_path": str(held_out), "init_adapter": "runs/sft"},  # relative to the registry
    })
    run_recipe(resolve_recipe("sft", registry), tmp_path / "runs" / "sft", scoring=None)
    sft_weights = load_file(tmp_path / "runs" / "sft" / "adapter_model.safetensors")
    recipe = resolve_recipe("dpo", registry)
    assert recipe["init_adapter"] == str(tmp_path / "runs" / "sft")
    result = run_recipe(recipe, tmp_path / "runs" / "dpo", scoring=None)
    summary = json.loads((tmp_path / "runs" / "dpo" / "run_summary.json").read_text())

    # The reference is a frozen copy of the SFT adapter, weight for weight, not the base.
    model = result.model
    assert set(model.peft_config) == {"default", "ref"}
    reference = get_peft_model_state_dict(model, adapter_name="ref")
    assert reference.keys() == sft_weights.keys()
    for name, tensor in sft_weights.items():
        assert torch.equal(reference[name], tensor), name
    assert not any(p.requires_grad for name, p in model.named_parameters() if ".ref." in name)
    # At the first step the policy is the reference exactly: zero rewards, loss ln 2. Against the base (which the SFT
    # adapter is far from: it already prefers the chosen answers) the rewards would not be zero.
    first = summary["preferences"]["history"][0]
    assert first["step"] == 1 and first["rewards/chosen"] == 0 and first["rewards/rejected"] == 0, first
    assert summary["first_loss"] == pytest.approx(0.693147, abs=1e-5)
    # The DPO run starts where SFT ended: its held-out accuracy before training is the SFT adapter's, not the base's.
    tokenizer = load_tokenizer(str(tiny_model_dir))
    pairs = load_training_data(recipe, tokenizer)[0].validation
    with torch.no_grad(), model.disable_adapter():
        base_logits = model(torch.tensor([[5, 6, 7, 8]])).logits
        base_accuracy = preference_accuracy(model, pairs, pad_id=tokenizer.pad_token_id)
    model.set_adapter("ref")
    with torch.no_grad():
        sft_logits = model(torch.tensor([[5, 6, 7, 8]])).logits
    sft_accuracy = preference_accuracy(model, pairs, pad_id=tokenizer.pad_token_id)
    model.set_adapter("default")
    assert (sft_logits - base_logits).abs().max() > 1e-2 and sft_accuracy != base_accuracy
    assert summary["preferences"]["held_out_accuracy_before"] == sft_accuracy
    # It publishes the trained "default" alone, moved from the start.
    assert summary["init_adapter_sha256"] and summary["status"] == "completed" and summary["steps"] == 8
    published = load_file(tmp_path / "runs" / "dpo" / "adapter_model.safetensors")
    assert published.keys() == sft_weights.keys() and not (tmp_path / "runs" / "dpo" / "ref").exists()
    assert any(not torch.equal(published[name], sft_weights[name]) for name in published)

"""GRPO recipes: the reward registry, the RL recipe checks, and a real GRPO run on a tiny 4-bit DoRA model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from peft import PeftModel

from conftest import REPO_ROOT
from lora.adapters.attach import attach_adapter
from lora.core.errors import RecipeError
from lora.finetune import harness_scoring
from lora.models.loading import load_base_model, load_tokenizer
from lora.models.quantisation import QuantisationSettings
from lora.prompts.rewards import REWARDS, Sample, build_trl_reward, infer_labels, register_reward
from lora.prompts.rows import load_rows
from lora.prompts.templates import encode_prompt, prompt_text
from lora.recipes.registry import resolve_recipe
from lora.training.run import run_recipe

SENTIMENT = str(REPO_ROOT / "data/train/sentiment_train.jsonl")
LABELS = ("negative", "neutral", "positive")
EXPECTED_FILES = {
    "README.md", "adapter_config.json", "adapter_model.safetensors", "chat_template.jinja", "loss_curve.png",
    "recipe.json", "run_summary.json", "tokenizer.json", "tokenizer_config.json", "trainer_state.json",
}


def write_registry(folder, recipes):
    path = folder / "finetune_configs.json"
    path.write_text(json.dumps(recipes, indent=2))
    return path


# ---- rewards ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "sample", "expected"), [
    ("exact_match", Sample("positive", "positive"), 1.0),
    ("exact_match", Sample(" Positive.\n", "positive"), 1.0),
    ("exact_match", Sample("The sentiment is positive.", "positive"), 0.0),
    ("label_match", Sample("The sentiment is positive.", "positive", labels=LABELS), 1.0),
    ("label_match", Sample("negative, not positive", "positive", labels=LABELS), 0.0),
    ("label_match", Sample("positive", "positive"), None),  # no label set: abstain
    ("numeric_match", Sample("39.1", "39.1"), 1.0),
    ("numeric_match", Sample("about $39.3 per share", "39.1", tolerance=0.01), 1.0),
    ("numeric_match", Sample("39.6", "39.1", tolerance=0.01), 0.0),
    ("numeric_match", Sample("0.004", "0.0", tolerance=0.0), 1.0),  # the absolute floor
    ("numeric_match", Sample("no idea", "39.1"), 0.0),
    ("numeric_match", Sample("39.1", "n/a"), None),
    ("format", Sample("neutral", "positive", labels=LABELS), 1.0),
    ("format", Sample("neutral", "positive", finished=False, labels=LABELS), 0.0),
    ("format", Sample("neutral because", "positive", labels=LABELS), 0.0),
    ("format", Sample("39.1", "40"), 1.0),
    ("format", Sample("39.1\nBecause", "40"), 0.0),
])
def test_builtin_rewards(name, sample, expected):
    assert REWARDS[name](sample) == expected


def test_trl_adapter_passes_rows_and_names_the_metric():
    reward = build_trl_reward("format", labels=LABELS, tolerance=0.01, end_token_ids={0})
    assert reward.__name__ == "format"  # TRL logs rewards/format/mean
    scores = reward(prompts=["p1", "p2", "p3"], completions=["neutral", [{"role": "assistant", "content": "neutral"}],
                                                             "neutral"],
                    completion_ids=[[5, 0], [5, 0], [5, 6]], target=["positive"] * 3, context=["c"] * 3,
                    trainer_state=None)
    assert scores == [1.0, 1.0, 0.0]  # chat completions are read as text; the last one did not finish


def test_labels_are_inferred_only_for_few_distinct_targets():
    assert infer_labels(["positive", "negative", "positive", "neutral"]) == LABELS
    assert infer_labels([str(i) for i in range(100)]) == ()
    assert infer_labels(["yes", "yes"]) == ()


@pytest.fixture
def rewards_restored():
    """The process-wide reward registry exactly as it was before the test, whatever the test registered: the test
    can run again in the same process, and no other test sees its rewards."""
    saved = dict(REWARDS)
    yield
    REWARDS.clear()
    REWARDS.update(saved)


def test_a_user_reward_is_a_decorated_function(tmp_path, rewards_restored):
    @register_reward("test_mentions_target")
    def mentions_target(sample: Sample) -> float:
        return float(sample.target in sample.completion)

    registry = write_registry(tmp_path, {"rl": {"base_model": "m", "dataset_path": "d.jsonl", "trainer": "grpo",
                                                "reward_functions": ["test_mentions_target"]}})
    assert resolve_recipe("rl", registry)["reward_functions"] == ["test_mentions_target"]
    with pytest.raises(ValueError, match="already registered"):
        register_reward("test_mentions_target")(lambda sample: 0.0)


# ---- recipe checks ------------------------------------------------------------------------------------------------

GRPO = {"trainer": "grpo", "reward_functions": ["exact_match"]}
BAD_RL_RECIPES = [
    ({**GRPO, "reward_functions": ["exact_mach"]}, ['no reward named "exact_mach" (did you mean "exact_match"?)']),
    ({**GRPO, "reward_functions": []}, ['"reward_functions": a grpo recipe needs at least one reward']),
    ({"trainer": "grpo"}, ['"reward_functions": a grpo recipe needs at least one reward (known: exact_match']),
    ({**GRPO, "reward_weights": [1.0, 0.5]}, ['"reward_weights": 2 weight(s) for 1 reward function(s)']),
    ({**GRPO, "batch_size": 6, "num_generations": 4}, ['field "batch_size"', "(6 x 1) must be a multiple of 4"]),
    ({**GRPO, "num_generations": 1}, ['field "num_generations"', "nearest valid value: 2"]),
    ({**GRPO, "kl_beta": -0.1}, ['field "kl_beta"', "nearest valid value: 0"]),
    ({**GRPO, "temperature": 0}, ['field "temperature"', "expected a value > 0"]),
    ({**GRPO, "validation_split": 0.1}, ['field "validation_split" applies to sft and dpo recipes only']),
    ({"trainer": "gpro"}, ['field "trainer"', 'nearest: "grpo"']),
    ({"num_generations": 4}, ['field "num_generations" only applies to grpo or rloo recipes (set "trainer": "grpo"']),
    ({"reward_functions": ["exact_match"]}, ['field "reward_functions" only applies to grpo or rloo recipes']),
]


@pytest.mark.parametrize(("fields", "fragments"), BAD_RL_RECIPES)
def test_bad_rl_fields_are_recipe_errors(tmp_path, fields, fragments):
    registry = write_registry(tmp_path, {"bad": {"base_model": "m", "dataset_path": "d.jsonl", **fields}})
    with pytest.raises(RecipeError) as caught:
        resolve_recipe("bad", registry)
    for fragment in fragments:
        assert fragment in str(caught.value)


def test_cli_bad_rl_field_exits_2_naming_the_field(tmp_path):
    registry = write_registry(tmp_path, {"bad": {"base_model": "m", "dataset_path": "d.jsonl", **GRPO,
                                                 "num_generations": 3}})
    result = subprocess.run([sys.executable, str(REPO_ROOT / "lora/finetune.py"), "bad", "--registry", str(registry),
                             "--dry-run"], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr
    assert 'field "batch_size"' in result.stderr and "multiple of 3" in result.stderr


def test_grpo_defaults_resolve(tmp_path):
    registry = write_registry(tmp_path, {"rl": {"base_model": "m", "dataset_path": "d.jsonl", **GRPO}})
    recipe = resolve_recipe("rl", registry)
    assert (recipe["num_generations"], recipe["kl_beta"], recipe["reward_weights"]) == (4, 0.04, None)
    assert recipe["batch_size"] % recipe["num_generations"] == 0  # the shared defaults fit together


@pytest.mark.parametrize("template", ["plain", "chat"])
def test_grpo_samples_after_the_prompt_ids_every_tool_uses(tiny_model_dir, template):
    from lora.training.grpo import RecipeGrpoTrainer, build_prompt_dataset

    tokenizer = load_tokenizer(str(tiny_model_dir))
    rows = load_rows(SENTIMENT)[:4]
    recipe = {"prompt_template": template, "seed": 0, "max_train_examples": None}
    prompts = build_prompt_dataset(recipe, tokenizer, rows)["prompt"]
    assert prompts[0].endswith(" ") if template == "plain" else isinstance(prompts[0], str)
    trainer_like = type("Trainer", (), {"processing_class": tokenizer, "prompt_template": template})()
    ids, images, fields = RecipeGrpoTrainer._tokenize_prompts(trainer_like, prompts)
    contexts = {prompt_text(row["context"], template, tokenizer): row["context"] for row in rows}
    assert ids == [encode_prompt(contexts[prompt], template, tokenizer) for prompt in prompts]
    assert images is None and fields == {}


# ---- a real run ---------------------------------------------------------------------------------------------------

def steerable_half_of_vocabulary(model) -> set[int]:
    """Tokens whose output-embedding row has a positive first coordinate.

    A random tiny model cannot be taught to emit any particular word: the adapter only moves the last hidden
    state, and a random output head turns that into a nearly flat distribution. This half of the vocabulary is
    different: moving the hidden state along one direction raises all of it together, so "start the answer with a
    token from this set" is a task the tiny model can learn in a few steps.
    """
    return set((model.get_output_embeddings().weight[:, 0] > 0).nonzero().flatten().tolist())


STEERABLE_TOKENS: set[int] = set()  # filled by the test once the model is loaded


def steerable_first_token(sample: Sample) -> float:
    """A user-defined reward, registered like any other: 1 when the answer starts in the steerable half."""
    return float(bool(sample.token_ids) and sample.token_ids[0] in STEERABLE_TOKENS)


def probability_of_set(model, tokenizer, prompts, token_ids, temperature) -> float:
    """Exact probability (under the sampling temperature) that the first generated token is in `token_ids`."""
    index = torch.tensor(sorted(token_ids))
    model.eval()
    with torch.no_grad():
        probabilities = [
            (model(input_ids=torch.tensor([p])).logits[0, -1] / temperature).softmax(-1)[index].sum().item()
            for p in prompts
        ]
    model.train()
    return sum(probabilities) / len(probabilities)


def _logits(model, tokenizer):
    batch = tokenizer(["Input: Shares rose sharply.\nAnswer: ", "The bank cut its dividend."], return_tensors="pt",
                      padding=True)
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


@pytest.fixture(scope="module")
def steerable_reward():
    """`test_steerable_first_token` registered for this module's runs only, then the registry as it was."""
    saved = dict(REWARDS)
    register_reward("test_steerable_first_token")(steerable_first_token)
    yield
    REWARDS.clear()
    REWARDS.update(saved)
    STEERABLE_TOKENS.clear()


@pytest.fixture(scope="module")
def registry(tmp_path_factory, tiny_model_dir, steerable_reward):
    common = {"base_model": str(tiny_model_dir), "dataset_path": SENTIMENT, "trainer": "grpo", "lora_r": 4,
              "lora_alpha": 8, "lora_dropout": 0.0, "learning_rate": 0.02, "lr_scheduler_type": "constant",
              "warmup_steps": 0, "logging_steps": 1,
              # The random head's logits span about +-0.2; sampling at 0.1 makes the adapter's moves visible.
              "temperature": 0.1}
    return write_registry(tmp_path_factory.mktemp("grpo-registry"), {
        "tiny_grpo_4bit_dora": {**common, "quant_bits": 4, "bnb_4bit_compute_dtype": "float32", "use_dora": True,
                                "reward_functions": ["test_steerable_first_token", "format"],
                                "reward_weights": [1.0, 0.1], "kl_beta": 0.04, "max_steps": 8, "batch_size": 8,
                                # 0.01: after the prompt the shared encoding gives (no trailing space), 0.02 overshoots
                                "learning_rate": 0.01,
                                "num_generations": 4, "max_completion_length": 2},
        "tiny_grpo_fp32_lora": {**common, "quant_bits": None, "reward_functions": ["test_steerable_first_token"],
                                "max_train_examples": 32, "max_steps": 4, "save_steps": 2, "batch_size": 4,
                                "num_generations": 2, "max_completion_length": 1},
    })


def test_grpo_recipe_runs_end_to_end_on_tiny_4bit_dora(registry, tmp_path):
    recipe = resolve_recipe("tiny_grpo_4bit_dora", registry)
    tokenizer = load_tokenizer(recipe["base_model"])
    base = load_base_model(recipe["base_model"], QuantisationSettings.from_recipe(recipe))
    STEERABLE_TOKENS.update(steerable_half_of_vocabulary(base))
    prompts = [encode_prompt(row["context"], "plain", tokenizer) for row in load_rows(SENTIMENT)[:12]]
    before = probability_of_set(base, tokenizer, prompts, STEERABLE_TOKENS, recipe["temperature"])
    parameters_with_adapter = sum(p.numel() for p in attach_adapter(recipe, base).parameters())

    out = tmp_path / "run"
    result = run_recipe(recipe, out, scoring=harness_scoring())
    model = result.model

    # The KL reference is the base with the adapter disabled: no reference model, no copied "ref" adapter.
    assert list(model.peft_config) == ["default"]
    assert sum(p.numel() for p in model.parameters()) == parameters_with_adapter
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}  # not TRL's bf16 cast

    summary = json.loads((out / "run_summary.json").read_text())
    history = summary["rewards"]["reward_history"]
    rewards = [entry["reward"] for entry in history]
    assert summary["status"] == "completed" and summary["steps"] == 8 and len(rewards) == 8
    assert all("rewards/test_steerable_first_token/mean" in e and "rewards/format/mean" in e for e in history)
    assert summary["rewards"]["first_reward"] == rewards[0] and summary["rewards"]["final_reward"] == rewards[-1]
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.1, rewards  # the reward rises...
    after = probability_of_set(model, result.tokenizer, prompts, STEERABLE_TOKENS, recipe["temperature"])
    assert after > before + 0.2, (before, after)  # ...because the policy learnt the task
    assert history[-1]["kl"] > 0  # and moved away from the base it is compared with
    assert 0 < summary["answer_tokens_seen"] <= 8 * 8 * 2 < summary["tokens_seen"]

    # Same artifacts as a supervised run; stock peft reloads the adapter onto a freshly quantised base.
    assert {p.name for p in out.iterdir()} == EXPECTED_FILES
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["use_dora"] is True and config["peft_type"] == "LORA"
    assert json.loads((out / "recipe.json").read_text())["trainer"] == "grpo"
    fresh = load_base_model(recipe["base_model"], QuantisationSettings.from_recipe(recipe))
    reloaded = PeftModel.from_pretrained(fresh, out)
    torch.testing.assert_close(_logits(reloaded, tokenizer), _logits(model, tokenizer), rtol=1e-5, atol=1e-5)


def test_grpo_resume_continues_bit_identically(registry, tmp_path, tiny_model_dir):
    recipe = resolve_recipe("tiny_grpo_fp32_lora", registry)
    base = load_base_model(str(tiny_model_dir), QuantisationSettings.unquantised())
    STEERABLE_TOKENS.update(steerable_half_of_vocabulary(base))
    straight = run_recipe(recipe, tmp_path / "straight", scoring=harness_scoring())
    checkpoint = tmp_path / "straight" / "checkpoints" / "checkpoint-2"
    resumed = run_recipe(recipe, tmp_path / "resumed", resume=str(checkpoint), scoring=harness_scoring())

    assert resumed.summary["steps"] == 4
    assert [entry["step"] for entry in resumed.summary["rewards"]["reward_history"]] == [3, 4]
    adapter = {name: p for name, p in straight.model.named_parameters() if p.requires_grad}
    for name, p in resumed.model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p, adapter[name], rtol=0, atol=0, msg=name)

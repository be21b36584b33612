"""RL on a verifiable task: the arithmetic rewards, a reward that fails stopping the run, the RL settings as
validated recipe fields, and real RLOO runs on a tiny model (the reward rises; kill -9 and --resume give the
uninterrupted adapter bit for bit)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO_ROOT
from lora.core.errors import RecipeError
from lora.finetune import harness_scoring, main
from lora.models.loading import load_base_model, load_tokenizer
from lora.models.quantisation import QuantisationSettings
from lora.prompts.rewards import REWARDS, RewardError, Sample, build_trl_reward, register_reward
from lora.prompts.rows import load_rows
from lora.prompts.templates import encode_prompt
from lora.recipes.registry import resolve_recipe
from lora.training.run import run_recipe

SENTIMENT = str(REPO_ROOT / "data/train/sentiment_train.jsonl")
ARITH = str(REPO_ROOT / "data/train/arith_train.jsonl")


def write_registry(folder, recipes):
    path = folder / "finetune_configs.json"
    path.write_text(json.dumps(recipes, indent=2))
    return path


# ---- rewards ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "sample", "expected"), [
    ("exact_number", Sample("42", "42"), 1.0),
    ("exact_number", Sample(" 42 dollars\n", "42"), 1.0),
    ("exact_number", Sample("$1,042", "1042"), 1.0),
    ("exact_number", Sample("43", "42"), 0.0),
    ("exact_number", Sample("12 + 30 = 42", "42"), 0.0),  # the FIRST number is the answer, as the eval task reads it
    ("exact_number", Sample("no idea", "42"), 0.0),
    ("exact_number", Sample("42", "n/a"), None),
    ("numeric_closeness", Sample("42", "42"), 1.0),
    ("numeric_closeness", Sample("40", "50"), 0.8),
    ("numeric_closeness", Sample("-1", "0"), 0.0),  # relative to max(|target|, 1): a 0 target is reachable
    ("numeric_closeness", Sample("500", "50"), 0.0),  # floored at 0
    ("numeric_closeness", Sample("none", "50"), 0.0),
    ("numeric_closeness", Sample("5", "n/a"), None),
])
def test_arithmetic_rewards(name, sample, expected):
    score = REWARDS[name](sample)
    assert score is None if expected is None else score == pytest.approx(expected)


def test_partial_credit_ranks_answers_by_closeness():
    scores = [REWARDS["numeric_closeness"](Sample(answer, "30")) for answer in ("30", "31", "35", "60", "x")]
    assert scores == sorted(scores, reverse=True) and scores[0] == 1.0 and scores[-1] == 0.0


@register_reward("test_raises")
def raises(sample: Sample) -> float:
    return 1.0 / len(sample.completion)  # ZeroDivisionError on an empty completion


@register_reward("test_not_finite")
def not_finite(sample: Sample) -> float:
    return math.nan if "7" in sample.completion else 1.0


@register_reward("test_infinite")
def infinite(sample: Sample) -> float:
    return math.inf


@pytest.mark.parametrize(("name", "fragments"), [
    ("test_raises", ['reward "test_raises" raised ZeroDivisionError', "completion ''", "target '3'"]),
    ("test_not_finite", ['reward "test_not_finite" returned nan', "completion '7'", "finite number, or None"]),
])
def test_a_failing_reward_is_an_error_naming_it_and_the_completion(name, fragments):
    reward = build_trl_reward(name, labels=(), tolerance=0.01, end_token_ids={0})
    assert reward(prompts=["p"], completions=["5"], completion_ids=[[1, 0]], target=["3"]) == [1.0]
    with pytest.raises(RewardError) as caught:
        reward(prompts=["p", "p"], completions=["5", "" if name == "test_raises" else "7"],
               completion_ids=[[1, 0], [0]], target=["3", "3"])
    for fragment in fragments:
        assert fragment in str(caught.value)


# ---- recipe fields ------------------------------------------------------------------------------------------------

RLOO = {"trainer": "rloo", "reward_functions": ["exact_number"], "batch_size": 8, "num_generations": 4}
GRPO = {**RLOO, "trainer": "grpo"}
BAD_FIELDS = [
    ({**GRPO, "loss_type": "ppo"}, ['field "loss_type"', '"ppo" is not allowed', "allowed:"]),
    ({**GRPO, "scale_rewards": "batchwise"}, ['field "scale_rewards"', 'nearest: "batch"']),
    ({**GRPO, "scale_rewards": True}, ['field "scale_rewards"']),
    ({**GRPO, "num_iterations": 0}, ['field "num_iterations"', "nearest valid value: 1"]),
    ({**GRPO, "num_iterations": 1.5}, ['field "num_iterations"', "is not of type 'integer'"]),
    ({**GRPO, "num_iterations": 2, "epsilon": 0}, ['field "epsilon"', "expected a value > 0"]),
    ({**GRPO, "num_iterations": 2, "epsilon_high": -0.1}, ['field "epsilon_high"', "expected a value > 0"]),
    ({**GRPO, "num_iterations": 2, "epsilon": 0.2, "epsilon_high": 0.1}, ['field "epsilon_high": 0.1 is below '
                                                                         "epsilon (0.2)"]),
    ({**GRPO, "epsilon": 0.3}, ['field "epsilon" has no effect with num_iterations 1']),
    ({**RLOO, "epsilon_high": 0.28}, ['field "epsilon_high" has no effect with num_iterations 1']),
    ({**GRPO, "entropy_coef": -1}, ['field "entropy_coef"', "nearest valid value: 0"]),
    ({**GRPO, "use_adaptive_entropy": "yes"}, ['field "use_adaptive_entropy"', "is not of type 'boolean'"]),
    ({**GRPO, "use_adaptive_entropy": True, "entropy_target": 0}, ['field "entropy_target"', "expected a value > 0"]),
    ({**GRPO, "entropy_target": 0.5}, ['field "entropy_target" needs "use_adaptive_entropy": true']),
    ({**RLOO, "normalize_advantages": 1}, ['field "normalize_advantages"', "is not of type 'boolean'"]),
    ({**RLOO, "scale_rewards": "batch"}, ['field "scale_rewards" only applies to grpo recipes']),
    ({**RLOO, "use_adaptive_entropy": True}, ['field "use_adaptive_entropy" only applies to grpo recipes']),
    ({**RLOO, "loss_type": "dapo"}, ['field "loss_type" only applies to grpo or dpo recipes']),
    ({**GRPO, "loss_type": "sigmoid"}, ['field "loss_type": "sigmoid" is a loss of another trainer, not of grpo',
                                        'nearest: "dapo"']),
    ({**GRPO, "normalize_advantages": True}, ['field "normalize_advantages" only applies to rloo recipes']),
    ({"num_iterations": 2}, ['field "num_iterations" only applies to grpo or rloo recipes']),
    ({**RLOO, "reward_functions": []}, ['"reward_functions": a rloo recipe needs at least one reward']),
    ({**RLOO, "batch_size": 6}, ['field "batch_size"', "(6 x 1) must be a multiple of 4"]),
    ({**RLOO, "kl_beta": -1}, ['field "kl_beta"', "nearest valid value: 0"]),
    ({"trainer": "rlo"}, ['field "trainer"', 'nearest: "rloo"']),
]


@pytest.mark.parametrize(("fields", "fragments"), BAD_FIELDS)
def test_bad_rl_settings_are_recipe_errors_naming_the_field(tmp_path, fields, fragments):
    registry = write_registry(tmp_path, {"bad": {"base_model": "m", "dataset_path": "d.jsonl", **fields}})
    with pytest.raises(RecipeError) as caught:
        resolve_recipe("bad", registry)
    for fragment in fragments:
        assert fragment in str(caught.value)


@pytest.mark.parametrize("override", ["loss_type=ppo", "scale_rewards=batchwise", "num_iterations=0", "epsilon=0",
                                      "epsilon_high=-1", "entropy_coef=-1", "use_adaptive_entropy=2",
                                      "entropy_target=0", "normalize_advantages=2"])
def test_cli_bad_rl_setting_exits_2_naming_the_field(tmp_path, capsys, override):
    registry = write_registry(tmp_path, {"rl": {"base_model": "m", "dataset_path": "d.jsonl", **GRPO}})
    trainer = "rloo" if override.startswith("normalize") else "grpo"
    assert main(["rl", "--registry", str(registry), "--dry-run", "--set", f"trainer={trainer}", "--set",
                 override]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and "Traceback" not in error
    assert f'field "{override.split("=")[0]}"' in error


def test_rl_settings_resolve_to_trl_defaults_and_reach_the_configs(tmp_path, tiny_model_dir):
    from lora.training.grpo import build_grpo_config
    from lora.training.rloo import build_rloo_config

    registry = write_registry(tmp_path, {
        "g": {"base_model": "m", "dataset_path": "d.jsonl", **GRPO},
        "g2": {"base_model": "m", "dataset_path": "d.jsonl", **GRPO, "loss_type": "dr_grpo", "scale_rewards": "batch",
               "num_iterations": 2, "epsilon": 0.1, "epsilon_high": 0.28, "use_adaptive_entropy": True,
               "entropy_target": 0.5, "entropy_coef": 0.01, "kl_beta": 0.0},
        "r": {"base_model": "m", "dataset_path": "d.jsonl", **RLOO, "normalize_advantages": True, "num_iterations": 2,
              "epsilon": 0.3},
    })
    default = build_grpo_config(resolve_recipe("g", registry), tmp_path / "c", stop_ids=[0])
    assert (default.loss_type, default.scale_rewards, default.num_iterations, default.epsilon, default.epsilon_high,
            default.use_adaptive_entropy) == ("dapo", "group", 1, 0.2, None, False)  # TRL's own defaults
    grpo = build_grpo_config(resolve_recipe("g2", registry), tmp_path / "c", stop_ids=[0])
    assert (grpo.loss_type, grpo.scale_rewards, grpo.num_iterations, grpo.epsilon, grpo.epsilon_high, grpo.beta,
            grpo.use_adaptive_entropy, grpo.entropy_target, grpo.entropy_coef) == (
        "dr_grpo", "batch", 2, 0.1, 0.28, 0.0, True, 0.5, 0.01)
    rloo = build_rloo_config(resolve_recipe("r", registry), tmp_path / "c", stop_ids=[0])
    assert (rloo.normalize_advantages, rloo.num_iterations, rloo.epsilon, rloo.num_generations, rloo.beta) == (
        True, 2, 0.3, 4, 0.04)


# ---- real runs ----------------------------------------------------------------------------------------------------

STEERABLE_TOKENS: set[int] = set()


@register_reward("test_rloo_steerable_first_token")
def steerable_first_token(sample: Sample) -> float:
    """1 when the answer starts with a token of the half of the vocabulary the adapter can raise together (see
    tests/test_grpo.py: a random tiny model cannot be taught a particular word, but it can be taught this)."""
    return float(bool(sample.token_ids) and sample.token_ids[0] in STEERABLE_TOKENS)


def probability_of_set(model, prompts, token_ids, temperature) -> float:
    index = torch.tensor(sorted(token_ids))
    model.eval()
    with torch.no_grad():
        probabilities = [(model(input_ids=torch.tensor([p])).logits[0, -1] / temperature).softmax(-1)[index].sum()
                         .item() for p in prompts]
    model.train()
    return sum(probabilities) / len(probabilities)


@pytest.fixture(scope="module")
def registry(tmp_path_factory, tiny_model_dir):
    common = {"base_model": str(tiny_model_dir), "dataset_path": SENTIMENT, "trainer": "rloo", "lora_r": 4,
              "lora_alpha": 8, "lora_dropout": 0.0, "lr_scheduler_type": "constant", "warmup_steps": 0,
              "logging_steps": 1, "temperature": 0.1}
    return write_registry(tmp_path_factory.mktemp("rloo-registry"), {
        "tiny_rloo_4bit_dora": {**common, "quant_bits": 4, "bnb_4bit_compute_dtype": "float32", "use_dora": True,
                                "reward_functions": ["test_rloo_steerable_first_token", "format"],
                                "reward_weights": [1.0, 0.1], "kl_beta": 0.04, "max_steps": 8, "batch_size": 8,
                                "learning_rate": 0.01, "normalize_advantages": True,
                                "num_generations": 4, "max_completion_length": 2},
        # Built-in rewards only: the resume test trains in a subprocess, which knows no test-registered reward.
        "tiny_rloo_resume": {**common, "quant_bits": None, "dataset_path": ARITH, "max_train_examples": 48,
                             "reward_functions": ["exact_number", "numeric_closeness", "format"],
                             "reward_weights": [1.0, 0.1, 0.1], "temperature": 1.0, "learning_rate": 0.01,
                             "max_steps": 12, "save_steps": 3, "save_total_limit": 2, "batch_size": 4,
                             "num_generations": 2, "max_completion_length": 3, "kl_beta": 0.04},
        "tiny_rloo_bad_reward": {**common, "quant_bits": None, "reward_functions": ["format", "test_infinite"],
                                 "max_steps": 4, "batch_size": 4, "num_generations": 2, "max_completion_length": 2},
    })


def test_rloo_recipe_runs_end_to_end_and_its_reward_rises(registry, tmp_path):
    recipe = resolve_recipe("tiny_rloo_4bit_dora", registry)
    tokenizer = load_tokenizer(recipe["base_model"])
    base = load_base_model(recipe["base_model"], QuantisationSettings.from_recipe(recipe))
    STEERABLE_TOKENS.update((base.get_output_embeddings().weight[:, 0] > 0).nonzero().flatten().tolist())
    prompts = [encode_prompt(row["context"], "plain", tokenizer) for row in load_rows(SENTIMENT)[:12]]
    before = probability_of_set(base, prompts, STEERABLE_TOKENS, recipe["temperature"])

    out = tmp_path / "run"
    result = run_recipe(recipe, out, scoring=harness_scoring())
    summary = json.loads((out / "run_summary.json").read_text())
    history = summary["rewards"]["reward_history"]
    rewards = [entry["reward"] for entry in history]
    assert summary["status"] == "completed" and summary["steps"] == 8 and len(rewards) == 8
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.1, rewards  # the reward rises...
    after = probability_of_set(result.model, prompts, STEERABLE_TOKENS, recipe["temperature"])
    assert after > before + 0.2, (before, after)  # ...because the policy learnt the task
    # The run record keeps, per step, the share of dead groups and the sampling entropy, and sums them up.
    assert all(0 <= entry["frac_reward_zero_std"] <= 1 and entry["entropy"] >= 0 for entry in history)
    dead = [entry["frac_reward_zero_std"] for entry in history]
    assert summary["rewards"]["dead_group_share"] == pytest.approx(sum(dead) / len(dead))
    assert summary["rewards"]["first_entropy"] == history[0]["entropy"]
    assert summary["rewards"]["final_entropy"] == history[-1]["entropy"]
    assert list(result.model.peft_config) == ["default"]  # the reference is the base: no copied adapter
    assert {p.dtype for p in result.model.parameters() if p.requires_grad} == {torch.float32}
    assert json.loads((out / "recipe.json").read_text())["trainer"] == "rloo"
    assert json.loads((out / "adapter_config.json").read_text())["use_dora"] is True


def test_a_reward_returning_inf_stops_the_run_with_exit_2(registry, tmp_path, capsys):
    out = tmp_path / "bad"
    assert main(["tiny_rloo_bad_reward", "--registry", str(registry), "--output-dir", str(out)]) == 2
    error = capsys.readouterr().err
    assert 'error: reward "test_infinite" returned inf' in error and "Traceback" not in error
    assert not (out / "adapter_config.json").exists()


def _checkpoint_steps(output_dir) -> list[int]:
    folder = output_dir / "checkpoints"
    return sorted(int(p.name.split("-")[1]) for p in folder.glob("checkpoint-*")) if folder.is_dir() else []


@pytest.mark.slow
def test_rloo_sigkill_then_resume_gives_the_uninterrupted_adapter(registry, tmp_path):
    interrupted = tmp_path / "interrupted"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    process = subprocess.Popen([sys.executable, str(REPO_ROOT / "lora/finetune.py"), "tiny_rloo_resume", "--registry",
                                str(registry), "--output-dir", str(interrupted)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + 240
    while not _checkpoint_steps(interrupted):
        if process.poll() is not None:
            pytest.fail(f"training ended before its first checkpoint:\n{process.stderr.read().decode()[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("no checkpoint appeared in time")
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    process.stderr.close()
    assert process.returncode == -signal.SIGKILL
    assert max(_checkpoint_steps(interrupted)) < 12
    assert not (interrupted / "adapter_config.json").exists()

    assert main(["tiny_rloo_resume", "--registry", str(registry), "--output-dir", str(interrupted), "--resume",
                 "auto"]) == 0
    summary = json.loads((interrupted / "run_summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 12
    uninterrupted = tmp_path / "uninterrupted"
    run_recipe(resolve_recipe("tiny_rloo_resume", registry), uninterrupted, scoring=harness_scoring())

    resumed = load_file(interrupted / "adapter_model.safetensors")
    reference = load_file(uninterrupted / "adapter_model.safetensors")
    assert resumed.keys() == reference.keys()
    for name, weight in reference.items():  # restored RNG, optimizer and sampler state: the same samples, bit for bit
        assert torch.equal(resumed[name], weight), name
    assert any(weight.abs().sum() > 0 for name, weight in reference.items() if "lora_B" in name)  # it did learn


@pytest.fixture(scope="module")
def start_adapter(tmp_path_factory, tiny_model_dir):
    """A DoRA adapter far from the base (random B and magnitudes), saved as the runner saves one."""
    from lora.adapters.attach import attach_adapter

    folder = tmp_path_factory.mktemp("rloo-start")
    registry = write_registry(folder, {"start": {"base_model": str(tiny_model_dir), "dataset_path": ARITH,
                                                 "quant_bits": None, "use_dora": True, "lora_r": 4, "lora_alpha": 8}})
    recipe = resolve_recipe("start", registry)
    model = attach_adapter(recipe, load_base_model(recipe["base_model"], QuantisationSettings.unquantised()))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "lora_magnitude_vector" in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.5)
    model.save_pretrained(folder / "start")
    return folder / "start"


@pytest.mark.parametrize("kl_beta", [0.1, 0.0])
def test_rloo_from_a_trained_adapter_starts_there_and_keeps_a_reference_only_for_a_kl_term(
        tmp_path, tiny_model_dir, start_adapter, kl_beta):
    registry = write_registry(tmp_path, {"after": {
        "base_model": str(tiny_model_dir), "dataset_path": ARITH, "quant_bits": None, "use_dora": True, "lora_r": 4,
        "lora_alpha": 8, "lora_dropout": 0.0, "init_adapter": str(start_adapter), "trainer": "rloo",
        "reward_functions": ["numeric_closeness", "format"], "num_generations": 2, "batch_size": 4,
        "max_completion_length": 3, "max_steps": 2, "logging_steps": 1, "kl_beta": kl_beta, "learning_rate": 0.01}})
    result = run_recipe(resolve_recipe("after", registry), tmp_path / "out", scoring=harness_scoring())
    start = load_file(start_adapter / "adapter_model.safetensors")
    if kl_beta:  # the KL reference is a frozen copy of the start, not the base: the first step's KL is 0
        from peft.utils import get_peft_model_state_dict

        assert set(result.model.peft_config) == {"default", "ref"}
        reference = get_peft_model_state_dict(result.model, adapter_name="ref")
        for name, tensor in start.items():
            torch.testing.assert_close(reference[name], tensor, rtol=0, atol=0, msg=name)
        assert abs(result.summary["rewards"]["reward_history"][0]["kl"]) < 1e-6
    else:  # no KL term: no reference is ever computed, so no copy of the adapter is held
        assert list(result.model.peft_config) == ["default"]
    trained = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert trained.keys() == start.keys()  # the trained adapter alone, no reference copy published
    assert result.summary["steps"] == 2
    # Whether 2 steps move it depends on the sampled rewards (a group with no reward spread gives no gradient, and
    # without a KL term nothing else does): the reward rising is tested on a learnable task above.


@pytest.mark.parametrize(("raw", "right"), [("42", True), (" 42 dollars.", True), ("$42", True), ("42.5", False),
                                            ("41 or 42", False), ("12 + 30 = 42", False), ("forty-two", False)])
def test_the_arith_eval_task_and_the_exact_number_reward_agree(raw, right):
    from eval.harness.metrics import numbers_match
    from eval.harness.tasks import load_tasks
    from lora.prompts.parsing import answer_text, parse_number

    task = load_tasks()["arith"]
    assert task.kind == "numeric" and (task.rel_tol, task.abs_tol) == (0, 0)  # exact match of the first number
    assert numbers_match(42.0, parse_number(answer_text(raw)), task.rel_tol, task.abs_tol) is right
    assert REWARDS["exact_number"](Sample(raw, "42")) == float(right)

"""The table of trainers, as the registry sees it: each trainer's name, the recipe fields only it accepts, and the
checks a recipe using it must pass. The registry (lora/recipes/registry.py) asks this table; nothing else knows which
fields belong to which trainer.

The other half of each entry, the code that builds the trainer, is `lora/training/trainers.py` (BUILDERS): the
recipes part comes before the training part in the import order, so the registry can read the declarations here
without importing torch, TRL or any trainer module. tests/test_trainers.py keeps the two tables' keys equal, the
schema's `trainer` enum equal to them, and every field named here a field of the schema.

Adding a trainer ("dpo", say) is one entry and one module:
  1. an entry `"dpo": TrainerRules(...)` in TRAINERS below: the recipe fields only it accepts (declared with their
     types and defaults in recipe_schema.json, with "dpo" added to the `trainer` enum there) and a check function
     for the cross-field rules the schema cannot say;
  2. one module `lora/training/dpo.py` with `load_training_data(recipe, tokenizer)` and
     `build_recipe_trainer(recipe, model, tokenizer, data, checkpoint_dir)`, named in `lora/training/trainers.py`'s
     BUILDERS as `"dpo": "lora.training.dpo"`.
A field several trainers accept (e.g. reward_functions for two RL trainers) is listed in each of their entries.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from lora.core.errors import did_you_mean

__all__ = [
    "DPO_LOSS_TYPES",
    "GRPO_LOSS_TYPES",
    "ONLINE_RL_FIELDS",
    "TRAINERS",
    "TrainerRules",
    "trainer_loss_type",
    "trainer_problems",
]

Check = Callable[[Mapping[str, Any], set[str]], list[str]]
Misplaced = Callable[[str, Any, Mapping[str, Any], tuple[str, ...]], "str | None"]


def _no_problems(fields: Mapping[str, Any], given: set[str]) -> list[str]:
    return []


def _only_for(key: str, value: Any, fields: Mapping[str, Any], accepting: tuple[str, ...]) -> str | None:
    """A field set in a recipe of a trainer that does not use it, whatever its value."""
    names = " or ".join(accepting)
    return f'field "{key}" only applies to {names} recipes (set "trainer": "{accepting[0]}", or drop it)'


@dataclass(frozen=True)
class TrainerRules:
    """One trainer as the registry validates it.

    Attributes:
        name: the value of the recipe's `trainer` field.
        fields: the recipe fields only this trainer (and any other entry listing them) accepts.
        check: the problems of a recipe that uses this trainer, `check(fields, given)` with the resolved fields and
            the names the user set (not defaults); each problem names its field.
        misplaced: the problem with one of `fields` set in the recipe of a trainer that does not accept it,
            `misplaced(key, value, fields, accepting_trainers)`, or None when that value is harmless there.
        data_formats: the data formats (lora/prompts/data_formats.py) its training rows may be in; a file in another
            format stops the run before any model loads.
    """

    name: str
    fields: tuple[str, ...] = ()
    check: Check = _no_problems
    misplaced: Misplaced = _only_for
    data_formats: tuple[str, ...] = ("finlora",)


# ---- sft ----------------------------------------------------------------------------------------------------------

def _sft_field_elsewhere(key: str, value: Any, fields: Mapping[str, Any], accepting: tuple[str, ...]) -> str | None:
    # Their off values (no validation set, no packing) say nothing, so a shared base may set them for every recipe.
    if not value:
        return None
    return (f'field "{key}" applies to {" and ".join(accepting)} recipes only; a {fields.get("trainer")} recipe is '
            "scored by its rewards and eval_tasks (drop it)")


SFT = TrainerRules(
    name="sft",
    fields=("validation_path", "validation_split", "eval_steps", "packing"),
    misplaced=_sft_field_elsewhere,
    data_formats=("finlora", "messages"),
)


# ---- grpo and rloo (online reinforcement learning) -----------------------------------------------------------

# What both RL trainers read: sampling, rewards, the KL weight and the clip range (TRL's names where TRL has one;
# kl_beta is TRL's beta).
ONLINE_RL_FIELDS = ("reward_functions", "reward_weights", "num_generations", "max_completion_length", "kl_beta",
                    "temperature", "reward_tolerance", "num_iterations", "epsilon", "epsilon_high")


def _online_rl_problems(fields: Mapping[str, Any], given: set[str]) -> list[str]:
    """Reinforcement-learning fields: they name registered rewards, the groups fit the batch, and the clip range
    is one that acts."""
    from lora.prompts.rewards import reward_names  # the registry; imports no torch

    trainer = fields.get("trainer")
    problems = []
    known = reward_names()
    names = fields.get("reward_functions")
    if not isinstance(names, list):  # already reported by the schema
        names = []
    elif not names:
        problems.append(f'field "reward_functions": a {trainer} recipe needs at least one reward '
                        f'(known: {", ".join(known)})')
    for name in names:
        if isinstance(name, str) and name not in known:
            problems.append(f'field "reward_functions": no reward named "{name}"{did_you_mean(name, known)} '
                            f"(known: {', '.join(known)}; add one with @register_reward in lora/prompts/rewards.py)")
    weights = fields.get("reward_weights")
    if isinstance(weights, list) and len(weights) != len(names):
        problems.append(f'field "reward_weights": {len(weights)} weight(s) for {len(names)} reward function(s) '
                        "(give one per entry of reward_functions, or null for all 1.0)")
    batch, accumulation, group = (fields.get(key) for key in ("batch_size", "gradient_accumulation_steps",
                                                               "num_generations"))
    if all(isinstance(v, int) and v > 0 for v in (batch, accumulation, group)) and (batch * accumulation) % group:
        problems.append(f'field "batch_size": {str(trainer).upper()} samples num_generations ({group}) completions '
                        f"per prompt, so batch_size x gradient_accumulation_steps ({batch} x {accumulation}) must be a "
                        f"multiple of {group} (batch_size counts completions, not prompts)")
    low, high = fields.get("epsilon"), fields.get("epsilon_high")
    if _is_number(low) and _is_number(high) and 0 < high < low:
        problems.append(f'field "epsilon_high": {high} is below epsilon ({low}); the clip range is [1 - epsilon, '
                        f"1 + epsilon_high] (nearest valid value: {low}, or null for epsilon)")
    if fields.get("num_iterations") == 1:
        for key in ("epsilon", "epsilon_high"):
            if key in given:
                problems.append(f'field "{key}" has no effect with num_iterations 1: each batch is trained on once, '
                                "by the policy that sampled it, so the probability ratio is 1 and never clipped "
                                '(set "num_iterations" to 2 or more, or drop it)')
    return problems


# `loss_type` is TRL's field name in both GRPOConfig and DPOConfig, with different values: one recipe field, whose
# allowed values and default depend on the trainer (the schema's enum is their union, kept equal by a test).
GRPO_LOSS_TYPES = ("dapo", "grpo", "dr_grpo", "bnpo", "cispo", "sapo")
DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
_LOSS_TYPES = {"grpo": GRPO_LOSS_TYPES, "dpo": DPO_LOSS_TYPES}


def trainer_loss_type(fields: Mapping[str, Any]) -> str:
    """The recipe's loss_type, or TRL's default for its trainer when the recipe leaves it null."""
    return fields.get("loss_type") or _LOSS_TYPES[fields["trainer"]][0]


def _loss_type_problems(fields: Mapping[str, Any]) -> list[str]:
    value, allowed = fields.get("loss_type"), _LOSS_TYPES[fields["trainer"]]
    if value is None or value in allowed:
        return []
    return [f'field "loss_type": "{value}" is a loss of another trainer, not of {fields["trainer"]} (allowed: '
            f'{", ".join(allowed)}; nearest: "{allowed[0]}", TRL\'s default)']


def _grpo_problems(fields: Mapping[str, Any], given: set[str]) -> list[str]:
    """The RL checks, and the entropy guard's target only where the guard is on."""
    problems = _online_rl_problems(fields, given) + _loss_type_problems(fields)
    if "entropy_target" in given and fields.get("use_adaptive_entropy") is False:
        problems.append('field "entropy_target" needs "use_adaptive_entropy": true (the target only steers the '
                        "adaptive entropy guard; set it, or drop entropy_target)")
    return problems


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


GRPO = TrainerRules(
    name="grpo",
    fields=ONLINE_RL_FIELDS + ("loss_type", "scale_rewards", "entropy_coef", "use_adaptive_entropy",
                               "entropy_target"),
    check=_grpo_problems,
)
RLOO = TrainerRules(
    name="rloo",
    fields=ONLINE_RL_FIELDS + ("normalize_advantages",),
    check=_online_rl_problems,
)


# ---- dpo ----------------------------------------------------------------------------------------------------------

def _dpo_problems(fields: Mapping[str, Any], given: set[str]) -> list[str]:
    """DPO trains on pairs: an explicitly declared data format other than preference cannot work."""
    problems = _loss_type_problems(fields)
    for index, entry in enumerate(fields.get("datasets") or []):
        if isinstance(entry, dict) and entry.get("format") not in (None, "auto", "preference"):
            problems.append(f'field "datasets[{index}]": a dpo recipe trains on preference rows ({{"prompt", '
                            f'"chosen", "rejected"}}), not "format": "{entry.get("format")}"')
    return problems


DPO = TrainerRules(
    name="dpo",
    fields=("validation_path", "validation_split", "eval_steps", "beta", "loss_type"),
    check=_dpo_problems,
    data_formats=("preference",),
)


# ---- the table ----------------------------------------------------------------------------------------------------

TRAINERS: dict[str, TrainerRules] = {rules.name: rules for rules in (SFT, GRPO, RLOO, DPO)}


def trainer_problems(fields: Mapping[str, Any], given: set[str]) -> list[str]:
    """The problems of a resolved recipe with its trainer: the trainer's own checks, then each field of another
    trainer that the recipe sets (in table order). An unknown trainer gives none: the schema's enum reports it.

    Args:
        fields: the resolved recipe fields (defaults filled in).
        given: the fields the user set, through the recipe, its `extends` chain or an override.
    """
    rules = TRAINERS.get(fields.get("trainer")) if isinstance(fields.get("trainer"), str) else None
    if rules is None:
        return []
    problems = list(rules.check(fields, given))
    seen = set(rules.fields)
    for other in TRAINERS.values():
        for key in other.fields:
            if key in seen or key not in given:
                continue
            seen.add(key)
            accepting = tuple(name for name, entry in TRAINERS.items() if key in entry.fields)
            problem = other.misplaced(key, fields.get(key), fields, accepting)
            if problem:
                problems.append(problem)
    return problems

"""RLOO (REINFORCE leave-one-out) for recipes with "trainer": "rloo": TRL's RLOOTrainer, built from a recipe so that
`lora/finetune.py` drives it exactly like the supervised and the GRPO trainers.

    python lora/finetune.py arith_smollm2_135m_4bits_r8_dora_rloo    # an rloo recipe, through the usual runner

Each step samples `num_generations` completions per prompt, scores them with the recipe's `reward_functions`, and
weighs each completion's log-likelihood by its reward minus the mean reward of the other completions of its prompt
(the leave-one-out baseline): the value-free successor of PPO, which TRL removed with its value-head model. With
`kl_beta` > 0 the KL to the reference policy is taken off each completion's reward (TRL's RLOO applies it as a
reward penalty; GRPO adds it to the loss). `normalize_advantages` scales the advantages of each batch to unit
spread (RLOO's counterpart of GRPO's `scale_rewards`).

Everything else is GRPO's (lora/training/grpo.py): the prompts and their encoding, the reward callables, the
reference (the frozen base, or the starting adapter), the adapter dtypes, the run record and the checkpoints.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from trl import RLOOConfig, RLOOTrainer

from lora.training.grpo import OnlineRlTrainer, build_online_rl_trainer, load_training_data, online_rl_arguments

# load_training_data is GRPO's: the same rows, read the same way.
__all__ = ["RecipeRlooTrainer", "build_recipe_trainer", "build_rloo_config", "build_rloo_trainer",
           "load_training_data"]


class RecipeRlooTrainer(OnlineRlTrainer, RLOOTrainer):
    """TRL's RLOOTrainer with the runner's behaviour (lora.training.grpo.OnlineRlTrainer)."""


def build_rloo_config(recipe, checkpoint_dir: Path, *, stop_ids: Sequence[int]) -> RLOOConfig:
    """RLOOConfig from a recipe: the arguments every online RL trainer takes, plus RLOO's advantage scaling."""
    return RLOOConfig(
        **online_rl_arguments(recipe, checkpoint_dir, stop_ids=stop_ids),
        normalize_advantages=recipe["normalize_advantages"],
    )


def build_rloo_trainer(recipe, model, tokenizer, train_rows: list[dict], checkpoint_dir: Path):
    """An RLOO trainer for a peft model built by lora.models.loading, and the history its callbacks fill.

    Args:
        recipe: a resolved recipe with "trainer": "rloo".
        model: the peft model (LoRA/DoRA attached, base frozen) that run_recipe built.
        tokenizer: its tokenizer.
        train_rows: the training rows ({"context", "target", ...}) as lora.prompts.rows.load_rows reads them.
        checkpoint_dir: where resumable checkpoints go.

    Returns:
        (trainer, history), as lora.training.grpo.build_grpo_trainer returns them.
    """
    return build_online_rl_trainer(RecipeRlooTrainer, build_rloo_config, recipe, model, tokenizer, train_rows,
                                   checkpoint_dir)


def build_recipe_trainer(recipe, model, tokenizer, data: list[dict], checkpoint_dir: Path):
    """The "rloo" entry of the trainer table (lora/training/trainers.py): build_rloo_trainer on the rows that
    `load_training_data` read."""
    return build_rloo_trainer(recipe, model, tokenizer, data, checkpoint_dir)

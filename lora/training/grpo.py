"""GRPO (reinforcement learning) for recipes with "trainer": "grpo": TRL's GRPOTrainer, on Accelerate, built from a
recipe so that `lora/finetune.py` drives it exactly like the supervised Trainer.

    python lora/finetune.py arith_smollm2_135m_4bits_r8_dora_grpo    # a grpo recipe, through the usual runner

Each step samples `num_generations` completions per prompt from the adapter-wrapped model, scores them with the
recipe's `reward_functions` (lora/prompts/rewards.py), and raises the likelihood of the completions that beat their
group's mean reward. With `kl_beta` > 0 a KL term keeps the policy near the reference policy, which is the frozen base
with the adapter switched off (peft's `disable_adapter`): no second copy of the model and no copy of the adapter is
held.

Prompts are the rows' contexts under the recipe's `prompt_template` (lora.prompts.templates.prompt_text), encoded by the
rule training, the evaluation harness and the server share (lora.prompts.templates.encode_prompt_text: trailing
whitespace left for the answer); each row's `target` reaches the reward functions. Completions end at the tokens the
harness and the server stop at (lora.prompts.generation.stop_token_ids).

What GRPO and RLOO (lora/training/rloo.py) share lives here: the prompt dataset, the reward callables, the run-record
history, the trainer behaviour (OnlineRlTrainer) and the reference and dtype rules (build_online_rl_trainer).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from lora.prompts.generation import stop_token_ids
from lora.prompts.mixtures import dataset_specs, mix_datasets
from lora.prompts.rewards import build_trl_reward, infer_labels
from lora.prompts.templates import adds_special_tokens, check_template, encode_prompt_text, prompt_text
from lora.recipes.trainers import trainer_loss_type
from lora.training.sft import (
    ProgressAndGuard,
    RecipeTrainer,
    TrainingHistory,
    shared_trainer_arguments,
    use_recipe_callbacks,
)

__all__ = [
    "LOGGED_METRICS",
    "GrpoHistory",
    "OnlineRlTrainer",
    "RecipeGrpoTrainer",
    "RewardLog",
    "build_grpo_config",
    "build_grpo_trainer",
    "build_online_rl_trainer",
    "build_prompt_dataset",
    "build_recipe_trainer",
    "build_reward_functions",
    "load_training_data",
    "online_rl_arguments",
    "restore_adapter_dtypes",
    "use_base_as_reference",
]

# What TRL logs per logging step that the run record keeps (besides rewards/<name>/mean for each reward).
LOGGED_METRICS = ("reward", "reward_std", "frac_reward_zero_std", "kl", "entropy", "completions/mean_length",
                  "completions/clipped_ratio")


@dataclass
class GrpoHistory(TrainingHistory):
    """TrainingHistory plus the rewards TRL logs: one dict per logging step (step, reward, rewards/<name>/mean, ...)."""

    rewards: list[dict] = field(default_factory=list)

    def reward_record(self) -> dict:
        """Reward figures for run_summary.json: first and final mean reward, the mean share of dead groups (all
        answers of a prompt rewarded alike: no learning signal), first and final sampling entropy, and the logged
        history (every step's reward, frac_reward_zero_std, entropy, kl, ...)."""

        def curve(key: str) -> list[float]:
            return [entry[key] for entry in self.rewards if entry.get(key) is not None]

        rewards, dead, entropy = curve("reward"), curve("frac_reward_zero_std"), curve("entropy")
        return {
            "first_reward": rewards[0] if rewards else None,
            "final_reward": rewards[-1] if rewards else None,
            "dead_group_share": sum(dead) / len(dead) if dead else None,
            "first_entropy": entropy[0] if entropy else None,
            "final_entropy": entropy[-1] if entropy else None,
            "reward_history": self.rewards,
        }


class RewardLog(TrainerCallback):
    """Keeps TRL's reward metrics in the history and shows the latest mean reward on the progress bar."""

    def __init__(self, history: GrpoHistory, progress: ProgressAndGuard):
        self.history = history
        self.progress = progress

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "reward" not in logs:
            return control
        entry = {"step": state.global_step}
        for key, value in logs.items():
            if key in LOGGED_METRICS or (key.startswith("rewards/") and key.endswith("/mean")):
                entry[key] = None if value is None or not math.isfinite(value) else float(value)
        self.history.rewards.append(entry)
        if self.progress.bar is not None and entry.get("reward") is not None:
            elapsed = time.perf_counter() - self.history.started_at
            self.progress.bar.set_postfix(loss=f"{logs.get('loss', float('nan')):.4f}", reward=f"{entry['reward']:.3f}",
                                          tok_s=f"{state.num_input_tokens_seen / elapsed if elapsed > 0 else 0:.0f}")
        return control


class OnlineRlTrainer(RecipeTrainer):
    """The SFT trainer's run behaviour for TRL's online RL trainers (GRPO, RLOO), which come after this class in the
    MRO (`class RecipeGrpoTrainer(OnlineRlTrainer, GRPOTrainer)`): atomic checkpoints under checkpoints/.incomplete/,
    the stop on a non-finite loss or adapter weight before that step is checkpointed; prompts encoded by the shared
    rule; and the completion tokens trained on counted as the run record's answer tokens."""

    completion_tokens_seen = 0
    prompt_template = "plain"  # set by build_online_rl_trainer: how its text prompts are encoded

    def _tokenize_prompts(self, prompts: list):
        # The dataset's prompts are rendered texts (chat turns included): encode them by the shared rule rather than
        # TRL's own tokenisation, so a sampled answer starts where a trained and a scored one does.
        ids = [encode_prompt_text(prompt, self.processing_class,
                                  add_special_tokens=adds_special_tokens(self.prompt_template)) for prompt in prompts]
        return ids, None, {}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # RL batches carry completion masks, not SFT labels: skip RecipeTrainer's label counting, use TRL's loss.
        return super(RecipeTrainer, self).compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        if self.model.training:
            self.completion_tokens_seen += int(output["completion_mask"].sum())
        return output

    def total_answer_tokens(self) -> int:
        """Generated tokens trained on, summed over all processes (the SFT trainer counts target tokens)."""
        count = torch.tensor([self.completion_tokens_seen], device=self.args.device)
        return int(self.accelerator.gather(count).sum())

    def create_model_card(self, *args, **kwargs):
        """TRL writes a hub model card into the checkpoint folder on every save; the runner writes its own."""


class RecipeGrpoTrainer(OnlineRlTrainer, GRPOTrainer):
    """TRL's GRPOTrainer with the runner's behaviour (OnlineRlTrainer)."""


def online_rl_arguments(recipe, checkpoint_dir: Path, *, stop_ids: Sequence[int]) -> dict:
    """The config arguments GRPOConfig and RLOOConfig share, from a recipe: the SFT optimisation and logging fields
    (lora.training.sft.shared_trainer_arguments), sampling, the KL weight and the clipped-ratio settings.

    `stop_ids` (lora.prompts.generation.stop_token_ids) are what sampling stops at, instead of TRL's own choice.
    """
    return dict(
        **shared_trainer_arguments(recipe, checkpoint_dir),
        eval_strategy="no",
        # TRL turns these on by default; the recipe decides, as for SFT (bf16 autocast is not what a recipe asked).
        gradient_checkpointing=recipe["gradient_checkpointing"],
        gradient_checkpointing_kwargs={"use_reentrant": False},
        bf16=False,
        num_generations=recipe["num_generations"],
        max_completion_length=recipe["max_completion_length"],
        beta=recipe["kl_beta"],
        temperature=recipe["temperature"],
        reward_weights=recipe["reward_weights"],
        generation_kwargs={"eos_token_id": list(stop_ids)},
        num_iterations=recipe["num_iterations"],
        epsilon=recipe["epsilon"],
        epsilon_high=recipe["epsilon_high"],
    )


def build_grpo_config(recipe, checkpoint_dir: Path, *, stop_ids: Sequence[int]) -> GRPOConfig:
    """GRPOConfig from a recipe: online_rl_arguments plus GRPO's loss, reward scaling and entropy guard."""
    return GRPOConfig(
        **online_rl_arguments(recipe, checkpoint_dir, stop_ids=stop_ids),
        loss_type=trainer_loss_type(recipe),
        scale_rewards=recipe["scale_rewards"],
        entropy_coef=recipe["entropy_coef"],
        use_adaptive_entropy=recipe["use_adaptive_entropy"],
        entropy_target=recipe["entropy_target"],
    )


def build_prompt_dataset(recipe, tokenizer, rows: list[dict]):
    """A `datasets.Dataset` with TRL's "prompt" column (the prompt text, chat template applied) plus every row column
    (target, context, ...), which TRL hands to the reward functions."""
    from datasets import Dataset

    template = recipe["prompt_template"]
    check_template(template, tokenizer)
    rows = list(rows)
    random.Random(recipe["seed"]).shuffle(rows)
    if recipe["max_train_examples"]:
        rows = rows[: recipe["max_train_examples"]]
    prompts = [prompt_text(row["context"], template, tokenizer) for row in rows]
    return Dataset.from_list([{**row, "prompt": prompt} for row, prompt in zip(rows, prompts)])


def build_reward_functions(recipe, rows: list[dict], stop_ids: Sequence[int]) -> list:
    """TRL reward callables for the recipe's `reward_functions`; a completion that ends in a stop token finished."""
    labels = infer_labels([row["target"] for row in rows])
    return [build_trl_reward(name, labels=labels, tolerance=recipe["reward_tolerance"], end_token_ids=set(stop_ids))
            for name in recipe["reward_functions"]]


def build_grpo_trainer(recipe, model, tokenizer, train_rows: list[dict], checkpoint_dir: Path):
    """A GRPO trainer for a peft model built by lora.models.loading, and the history its callbacks fill.

    Args:
        recipe: a resolved recipe with "trainer": "grpo".
        model: the peft model (LoRA/DoRA attached, base frozen) that run_recipe built.
        tokenizer: its tokenizer.
        train_rows: the training rows ({"context", "target", ...}) as lora.prompts.rows.load_rows reads them.
        checkpoint_dir: where resumable checkpoints go.

    Returns:
        (trainer, history): `trainer.train(resume_from_checkpoint=...)`, `trainer.state` and
        `trainer.total_answer_tokens()` work as for the SFT trainer; `history` is a TrainingHistory (losses,
        wall time, non-finite guard) with `rewards` and `reward_record()` added.
    """
    return build_online_rl_trainer(RecipeGrpoTrainer, build_grpo_config, recipe, model, tokenizer, train_rows,
                                   checkpoint_dir)


def build_online_rl_trainer(trainer_class, build_config, recipe, model, tokenizer, train_rows: list[dict],
                            checkpoint_dir: Path):
    """An online RL trainer (`trainer_class`, an OnlineRlTrainer) with its config from `build_config(recipe,
    checkpoint_dir, stop_ids=...)`; arguments and result as build_grpo_trainer's."""
    history = GrpoHistory()
    progress = ProgressAndGuard(history)
    adapter_dtypes = {name: p.dtype for name, p in model.named_parameters() if p.requires_grad}
    # Where an answer ends, as the harness scores it and the server serves it (EOS, the model's declared end ids,
    # the template's end of turn).
    stop_ids = stop_token_ids(tokenizer, recipe["prompt_template"], model.generation_config)
    trainer = trainer_class(
        model=model,
        reward_funcs=build_reward_functions(recipe, train_rows, stop_ids),
        args=build_config(recipe, checkpoint_dir, stop_ids=stop_ids),
        train_dataset=build_prompt_dataset(recipe, tokenizer, train_rows),
        processing_class=tokenizer,
        callbacks=[progress, RewardLog(history, progress)],
    )
    trainer.history = history  # RecipeTrainer's non-finite guard records into it
    # TRL cuts each completion after its first `eos_token_ids` token (its own list: EOS and the declared ids); cut
    # where sampling stopped, so a completion ends with its stop token and the rewards see it finished.
    trainer.eos_token_ids = list(stop_ids)
    trainer.prompt_template = recipe["prompt_template"]
    use_recipe_callbacks(trainer)
    # Without a KL term the reference is never computed: TRL's copy of a starting adapter would only cost memory.
    if not recipe["init_adapter"] or recipe["kl_beta"] == 0:
        use_base_as_reference(trainer.model)
    restore_adapter_dtypes(trainer.model, adapter_dtypes)
    return trainer, history


def load_training_data(recipe, tokenizer) -> tuple[list[dict], str]:
    """The "grpo" (and "rloo") entry of the trainer table (lora/training/trainers.py): the training rows, whose
    contexts become prompts and whose targets reach the rewards."""
    rows = mix_datasets(dataset_specs(recipe), recipe["seed"], formats=("finlora",)).rows
    return rows, f"{min(len(rows), recipe['max_train_examples'] or len(rows))} prompts for {recipe['trainer'].upper()}"


def build_recipe_trainer(recipe, model, tokenizer, data: list[dict], checkpoint_dir: Path):
    """The "grpo" entry of the trainer table: build_grpo_trainer on `load_training_data`'s rows."""
    return build_grpo_trainer(recipe, model, tokenizer, data, checkpoint_dir)


def use_base_as_reference(model) -> None:
    """Make the KL reference the frozen base (adapter disabled) instead of a copy of the adapter.

    Given an existing peft model, TRL 1.16 (GRPO and RLOO alike) adds a second adapter "ref" copied from "default"
    and takes the reference log-probabilities through it; without one it runs the model under `disable_adapter()`.
    A fresh adapter (LoRA B = 0, DoRA magnitude = the base's row norms) equals the base, so the copy only equals the
    base up to rounding and costs an adapter's memory. Dropping it leaves TRL's other branch: the base itself,
    exactly. A recipe with init_adapter keeps the copy when it has a KL term (kl_beta > 0): its reference is the
    starting policy (e.g. the supervised adapter), which the base is not.
    """
    if "ref" in getattr(model, "peft_config", {}):
        model.delete_adapter("ref")
        model.set_adapter("default")


def restore_adapter_dtypes(model, dtypes: dict[str, torch.dtype]) -> None:
    """Undo TRL's cast of LoRA weights to bfloat16 on quantised bases: the adapter trains in the dtype the runner
    chose (fp32), as in SFT recipes. Plain-bf16 weights with AdamW drop updates smaller than bf16's resolution
    (TRL already exempts DoRA magnitudes for that reason), and saved adapters keep their SFT format. The frozen
    "ref" copy (init_adapter) follows its "default" twin, so the reference is the starting adapter exactly."""
    for name, param in model.named_parameters():
        wanted = dtypes.get(name, dtypes.get(name.replace(".ref.", ".default.")))
        if wanted is not None and param.dtype != wanted:
            param.data = param.data.to(wanted)

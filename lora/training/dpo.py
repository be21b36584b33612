"""DPO (preference training) for recipes with "trainer": "dpo": TRL's DPOTrainer, built from a recipe so that
`lora/finetune.py` drives it exactly like the supervised Trainer (outputs, run record, --resume, trackers).

    python lora/finetune.py sentiment_smollm2_135m_4bits_r8_dora_dpo    # SFT adapter -> DPO on preference pairs

Rows are preference rows (lora/prompts/data_formats.py): {"prompt", "chosen", "rejected"}, plain or conversational,
FinLoRA's "context" accepted as the prompt. They are encoded by the rule training, scoring and serving share
(lora.prompts.templates.encode_completion: the prompt under the recipe's prompt_template, the answer and its end
token; a conversational prompt under the chat template), not by TRL's own tokenisation, so the answer DPO prefers is
the token sequence the harness scores.

The reference policy: the base with the adapter switched off (peft's disable_adapter: no second model, no copy of
the adapter), or, under init_adapter (SFT -> DPO), the starting adapter, which TRL keeps as a frozen "ref" copy.
The run record's "preferences" holds the held-out preference accuracy (the share of validation pairs whose chosen
answer the adapter gives a higher log-likelihood than the rejected one) before and after training, and TRL's logged
reward accuracies and margins.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback
from trl import DPOConfig, DPOTrainer

from lora.core.errors import DataError
from lora.prompts.templates import encode_completion
from lora.recipes.trainers import trainer_loss_type
from lora.training.data_mixture import TrainingData, training_rows
from lora.training.grpo import restore_adapter_dtypes, use_base_as_reference
from lora.training.sft import (
    ProgressAndGuard,
    RecipeTrainer,
    TrainingHistory,
    shared_trainer_arguments,
    use_recipe_callbacks,
)

__all__ = [
    "DpoHistory",
    "LOGGED_METRICS",
    "RecipeDpoTrainer",
    "build_dpo_config",
    "build_recipe_trainer",
    "encode_preference",
    "load_training_data",
    "preference_accuracy",
]

# What TRL logs per logging step that the run record keeps.
LOGGED_METRICS = ("rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected")


def _answer_text(side: Any, where: str, key: str) -> str:
    """A chosen/rejected answer as text: a string, or the content of a one-message assistant conversation."""
    if isinstance(side, str):
        return side
    if len(side) != 1 or side[0]["role"] != "assistant":
        raise DataError(f'{where}: a conversational "{key}" must be one assistant message '
                        '([{"role": "assistant", "content": ...}]), as in TRL\'s conversational preference rows.')
    return side[0]["content"]


def encode_preference(row: dict, template: str, tokenizer, max_seq_length: int, where: str = "row") -> dict:
    """prompt_ids, chosen_ids and rejected_ids of a preference row, by the shared encoding rule.

    The prompt's ids are the longest start both whole texts agree on; a prompt too long for max_seq_length loses its
    left end, and each answer keeps its start.
    """
    prompt = row["prompt"]
    chosen = encode_completion(prompt, _answer_text(row["chosen"], where, "chosen"), template, tokenizer)
    rejected = encode_completion(prompt, _answer_text(row["rejected"], where, "rejected"), template, tokenizer)
    start = min(chosen.answer_start, rejected.answer_start)
    prompt_ids = chosen.input_ids[:start]
    chosen_ids, rejected_ids = chosen.input_ids[start:], rejected.input_ids[start:]
    chosen_ids, rejected_ids = chosen_ids[:max_seq_length - 1], rejected_ids[:max_seq_length - 1]
    room = max_seq_length - max(len(chosen_ids), len(rejected_ids))
    return {"prompt_ids": prompt_ids[-room:], "chosen_ids": chosen_ids, "rejected_ids": rejected_ids}


def _encode_all(rows: list[dict], recipe, tokenizer, where: list[str] | None = None):
    from datasets import Dataset

    where = where or [f"row {i + 1}" for i in range(len(rows))]
    return Dataset.from_list([encode_preference(row, recipe["prompt_template"], tokenizer, recipe["max_seq_length"],
                                                location) for row, location in zip(rows, where, strict=True)])


def load_training_data(recipe, tokenizer) -> tuple[TrainingData, str]:
    """The "dpo" entry of the trainer table (lora/training/trainers.py): encoded preference pairs (train and, with a
    validation set, held-out), and what they hold."""
    rows = training_rows(recipe)
    train = _encode_all(rows.train, recipe, tokenizer, rows.train_where)
    validation = _encode_all(rows.validation, recipe, tokenizer) if rows.validation is not None else None
    description = f"{len(train)} preference pairs" + (f", {len(validation)} held out" if validation is not None
                                                      else "")
    return TrainingData(train=train, validation=validation, record=rows.record, rows=rows), description


@torch.no_grad()
def preference_accuracy(model, pairs, *, pad_id: int, batch_size: int = 8) -> float | None:
    """The share of pairs whose chosen answer the model gives a higher log-likelihood than the rejected one.

    Args:
        pairs: rows with prompt_ids, chosen_ids and rejected_ids (as encode_preference gives them).
    """
    if pairs is None or len(pairs) == 0:
        return None
    previous = [(module, module.training) for module in model.modules()]
    model.eval()
    device = next(model.parameters()).device
    wins = 0
    try:
        for begin in range(0, len(pairs), batch_size):
            batch = pairs[begin : begin + batch_size]
            sequences, answer_spans = [], []
            for side in ("chosen_ids", "rejected_ids"):
                for prompt, answer in zip(batch["prompt_ids"], batch[side], strict=True):
                    sequences.append(prompt + answer)
                    answer_spans.append((len(prompt), len(prompt) + len(answer)))
            width = max(len(ids) for ids in sequences)
            input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
            attention = torch.zeros_like(input_ids)
            for i, ids in enumerate(sequences):
                input_ids[i, : len(ids)] = torch.tensor(ids)
                attention[i, : len(ids)] = 1
            logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits.float()
            log_probs = torch.log_softmax(logits[:, :-1], dim=-1)
            picked = log_probs.gather(2, input_ids[:, 1:, None].to(device)).squeeze(2)
            totals = torch.stack([picked[i, start - 1 : end - 1].sum() for i, (start, end) in enumerate(answer_spans)])
            chosen, rejected = totals.chunk(2)
            wins += int((chosen > rejected).sum())
    finally:
        for module, was_training in previous:
            module.training = was_training
    return wins / len(pairs)


@dataclass
class DpoHistory(TrainingHistory):
    """TrainingHistory plus TRL's preference metrics per logging step and the held-out preference accuracy."""

    logged: list[dict] = field(default_factory=list)
    held_out_before: float | None = None
    model: Any = field(default=None, repr=False)
    held_out: Any = field(default=None, repr=False)
    pad_id: int = 0

    def preference_record(self) -> dict:
        """For run_summary.json: held-out preference accuracy before -> after (the adapter as published), and the
        logged reward accuracies and margins."""
        after = preference_accuracy(self.model, self.held_out, pad_id=self.pad_id) if self.held_out else None
        curve = [entry["rewards/accuracies"] for entry in self.logged if entry.get("rewards/accuracies") is not None]
        return {
            "held_out_pairs": len(self.held_out) if self.held_out is not None else 0,
            "held_out_accuracy_before": self.held_out_before,
            "held_out_accuracy_after": after,
            "first_train_reward_accuracy": curve[0] if curve else None,
            "final_train_reward_accuracy": curve[-1] if curve else None,
            "history": self.logged,
        }


class PreferenceLog(TrainerCallback):
    """Keeps TRL's preference metrics in the history (a resumed run's from its checkpoint's log, too)."""

    def __init__(self, history: DpoHistory):
        self.history = history

    def on_train_begin(self, args, state, control, **kwargs):
        # A run resumed from a checkpoint starts with that checkpoint's log: the record covers the whole run.
        self.history.logged = []
        for logs in state.log_history:
            self._keep(logs, logs.get("step", 0))
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        self._keep(logs or {}, state.global_step)
        return control

    def _keep(self, logs: dict, step: int) -> None:
        if "rewards/accuracies" in logs:
            self.history.logged.append({"step": step, **{
                key: (float(logs[key]) if logs.get(key) is not None and math.isfinite(logs[key]) else None)
                for key in LOGGED_METRICS if key in logs}})


class RecipeDpoTrainer(RecipeTrainer, DPOTrainer):
    """TRL's DPOTrainer with the SFT trainer's run behaviour (lora.training.sft.RecipeTrainer first in the MRO):
    atomic checkpoints, the stop on a non-finite loss or adapter weight; pairs arrive encoded by the shared rule."""

    completion_tokens_seen = 0

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        # Encoded by lora.training.dpo.encode_preference (the runner's one encoding rule), not re-tokenised by TRL.
        return dataset

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # DPO batches carry completion masks, not SFT labels: skip RecipeTrainer's label counting.
        if model.training:
            self.completion_tokens_seen += int(inputs["completion_mask"].sum())
        return DPOTrainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)

    def total_answer_tokens(self) -> int:
        """Chosen and rejected answer tokens trained on, summed over all processes."""
        count = torch.tensor([self.completion_tokens_seen], device=self.args.device)
        return int(self.accelerator.gather(count).sum())

    def create_model_card(self, *args, **kwargs):
        """TRL writes a hub model card into the checkpoint folder on every save; the runner writes its own."""


def build_dpo_config(recipe, checkpoint_dir: Path, *, has_validation: bool) -> DPOConfig:
    """DPOConfig from a recipe: the same optimisation and logging fields as SFT, plus TRL's beta and loss_type."""
    return DPOConfig(
        **shared_trainer_arguments(recipe, checkpoint_dir),
        per_device_eval_batch_size=recipe["batch_size"],
        eval_strategy="steps" if recipe["eval_steps"] and has_validation else "no",
        eval_steps=recipe["eval_steps"],
        # TRL turns these on by default; the recipe decides, as for SFT.
        gradient_checkpointing=recipe["gradient_checkpointing"],
        gradient_checkpointing_kwargs={"use_reentrant": False},
        bf16=False,
        max_length=None,  # encode_preference already fits each pair into max_seq_length
        include_num_input_tokens_seen="non_padding",
        beta=recipe["beta"],
        loss_type=[trainer_loss_type(recipe)],
    )


def build_recipe_trainer(recipe, model, tokenizer, data: TrainingData, checkpoint_dir: Path):
    """The "dpo" entry of the trainer table: a DPO trainer on `load_training_data`'s pairs and its history."""
    from lora.prompts.generation import padding_token_id, stop_token_ids

    history = DpoHistory()
    adapter_dtypes = {name: p.dtype for name, p in model.named_parameters() if p.requires_grad}
    if tokenizer.pad_token is None:  # TRL pads with the tokenizer's pad token; the runner's choice when it has none
        stops = stop_token_ids(tokenizer, recipe["prompt_template"], model.generation_config)
        tokenizer.pad_token_id = padding_token_id(tokenizer, stops)
    trainer = RecipeDpoTrainer(
        model=model,
        args=build_dpo_config(recipe, checkpoint_dir, has_validation=data.validation is not None),
        train_dataset=data.train,
        eval_dataset=data.validation,
        processing_class=tokenizer,
        callbacks=[ProgressAndGuard(history), PreferenceLog(history)],
    )
    trainer.history = history  # RecipeTrainer's non-finite guard records into it
    use_recipe_callbacks(trainer)
    if not recipe["init_adapter"]:
        use_base_as_reference(trainer.model)
    restore_adapter_dtypes(trainer.model, adapter_dtypes)
    history.model, history.held_out, history.pad_id = trainer.model, data.validation, tokenizer.pad_token_id
    history.held_out_before = preference_accuracy(trainer.model, data.validation, pad_id=tokenizer.pad_token_id)
    return trainer, history

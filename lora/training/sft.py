"""The training loop: the transformers Trainer (on Accelerate) configured from a recipe, with a progress bar that
shows loss and tokens/s, one-line milestones, a guard that stops on a non-finite loss, and checkpoints that appear
atomically (written under checkpoints/.incomplete/, then renamed into place)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from lora.core.files import remove_tree
from lora.prompts.templates import IGNORE_INDEX
from lora.training.run_folder import CHECKPOINT_STAGING_DIR, publish_checkpoint
from lora.training.sft_data import build_collator, build_datasets
from lora.training.tracking import hold_trackers

__all__ = [
    "accepts_logits_to_keep",
    "answer_only_loss",
    "build_recipe_trainer",
    "build_trainer",
    "build_training_arguments",
    "gathered_state_dict",
    "load_training_data",
    "next_token_targets",
    "peak_memory_bytes",
    "ProgressAndGuard",
    "RecipeTrainer",
    "shared_trainer_arguments",
    "TrainingHistory",
    "use_recipe_callbacks",
]


def shared_trainer_arguments(recipe, checkpoint_dir: Path) -> dict:
    """The Trainer arguments every recipe maps the same way, supervised or GRPO: optimisation, schedule, logging,
    checkpoints and device; each trainer adds its own on top."""
    return dict(
        output_dir=str(checkpoint_dir),
        per_device_train_batch_size=recipe["batch_size"],
        gradient_accumulation_steps=recipe["gradient_accumulation_steps"],
        learning_rate=recipe["learning_rate"],
        num_train_epochs=recipe["num_epochs"],
        max_steps=recipe["max_steps"],
        lr_scheduler_type=recipe["lr_scheduler_type"],
        warmup_steps=recipe["warmup_steps"] or recipe["warmup_ratio"],
        weight_decay=recipe["weight_decay"],
        max_grad_norm=recipe["max_grad_norm"],
        seed=recipe["seed"],
        data_seed=recipe["seed"],
        logging_steps=recipe["logging_steps"],
        logging_first_step=True,
        logging_nan_inf_filter=False,  # the stock filter hides a NaN loss from the logs (and from our guard)
        save_strategy="steps" if recipe["save_steps"] else "no",
        save_steps=recipe["save_steps"] or 500,
        save_total_limit=recipe["save_total_limit"],
        use_cpu=not torch.cuda.is_available(),
        dataloader_pin_memory=torch.cuda.is_available(),
        ddp_find_unused_parameters=False,
        report_to=recipe["report_to"],  # lora.training.tracking keeps these offline and logs the run record at the end
        run_name=recipe["run_name"],
        disable_tqdm=True,  # our own bar below shows loss and tokens/s
    )


def build_training_arguments(recipe, checkpoint_dir: Path) -> TrainingArguments:
    has_validation = bool(recipe["validation_path"]) or recipe["validation_split"] > 0
    return TrainingArguments(
        **shared_trainer_arguments(recipe, checkpoint_dir),
        per_device_eval_batch_size=recipe["batch_size"],
        eval_strategy="steps" if recipe["eval_steps"] else "no",
        eval_steps=recipe["eval_steps"],
        do_eval=has_validation,
        remove_unused_columns=False,
        include_num_input_tokens_seen="non_padding",
    )


@dataclass
class TrainingHistory:
    """What the run record and loss curve need, filled in by `ProgressAndGuard`."""

    losses: list[tuple[int, float]] = field(default_factory=list)
    eval_losses: list[tuple[int, float]] = field(default_factory=list)
    stopped_on_non_finite_loss: bool = False
    started_at: float = 0.0
    finished_at: float = 0.0

    @property
    def wall_time_s(self) -> float:
        return self.finished_at - self.started_at


class ProgressAndGuard(TrainerCallback):
    """A progress bar (main process only) with loss and tokens/s, and a stop on NaN/inf loss."""

    def __init__(self, history: TrainingHistory):
        self.history = history
        self.bar = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.history.started_at = time.perf_counter()
        if state.is_world_process_zero:
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="train", unit="step",
                            dynamic_ncols=True)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        already_recorded = bool(self.history.losses) and self.history.losses[-1][0] == state.global_step
        if "loss" in logs and not already_recorded:
            loss = float(logs["loss"])
            self.history.losses.append((state.global_step, loss))
            if not math.isfinite(loss):
                self.history.stopped_on_non_finite_loss = True
                control.should_training_stop = True
                control.should_save = False
        if "eval_loss" in logs:
            self.history.eval_losses.append((state.global_step, float(logs["eval_loss"])))
        if self.bar is not None and "loss" in logs:
            elapsed = time.perf_counter() - self.history.started_at
            tokens_per_s = state.num_input_tokens_seen / elapsed if elapsed > 0 else 0.0
            self.bar.set_postfix(loss=f"{logs['loss']:.4f}", tok_s=f"{tokens_per_s:.0f}")
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self.history.finished_at = time.perf_counter()
        if self.bar is not None:
            self.bar.close()


class RecipeTrainer(Trainer):
    """The stock Trainer, plus: answer-token counting for the run record, a stop on a non-finite loss or adapter
    weight before that step can be checkpointed, and checkpoints that appear atomically."""

    answer_tokens_seen = 0
    history: TrainingHistory | None = None  # set by build_trainer
    _non_finite_loss: float | None = None  # a NaN/inf micro-batch loss seen since the last optimizer step
    _checkpoint_root: Path | None = None  # while a checkpoint is being written: where it goes
    _projects_chosen_positions: bool | None = None  # accepts_logits_to_keep(model), decided on the first batch

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            self.answer_tokens_seen += int((inputs["labels"] != IGNORE_INDEX).sum())
        if self._projects_chosen_positions is None:
            self._projects_chosen_positions = accepts_logits_to_keep(self.accelerator.unwrap_model(model))
        if return_outputs or not self._projects_chosen_positions:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        loss = answer_only_loss(model, inputs, num_items_in_batch)
        counted_globally = self.args.average_tokens_across_devices and self.model_accepts_loss_kwargs
        if num_items_in_batch is not None and counted_globally:
            loss = loss * self.accelerator.num_processes  # as the stock Trainer: DDP averages, the count was global
        return loss

    def total_answer_tokens(self) -> int:
        """Answer tokens trained on, summed over all processes."""
        count = torch.tensor([self.answer_tokens_seen], device=self.args.device)
        return int(self.accelerator.gather(count).sum())

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not torch.isfinite(loss):
            self._non_finite_loss = float(loss)
        return loss

    def _maybe_log_save_evaluate(self, tr_loss, grad_norm, model, *args, **kwargs):
        # Runs after every optimizer step, before the step's log, evaluation and checkpoint: the one place where a
        # step with a NaN/inf loss (or one that made the adapter non-finite, e.g. through an inf gradient) can be
        # kept out of the checkpoints. The stock logging only shows an average of the last `logging_steps` losses.
        stopped_before = self.history.stopped_on_non_finite_loss  # e.g. the epoch-end call after the stop
        if stopped_before or self._training_became_non_finite():
            self.control.should_training_stop = True
            self.control.should_save = False
            self.control.should_evaluate = False
            if not stopped_before:
                self.history.stopped_on_non_finite_loss = True
                self.history.losses.append((self.state.global_step, self._non_finite_loss or float("nan")))
            return
        super()._maybe_log_save_evaluate(tr_loss, grad_norm, model, *args, **kwargs)

    def _training_became_non_finite(self) -> bool:
        """True on every process when any process saw a NaN/inf loss or holds a NaN/inf trainable weight."""
        local = self._non_finite_loss is not None
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        if trainable and not local:
            local = not bool(torch.stack([torch.isfinite(p).all() for p in trainable]).all())
        flag = torch.tensor([1.0 if local else 0.0], device=self.args.device)
        # Under DDP all replicas agree anyway; under FSDP/ZeRO-3 each rank sees only its shard, so agree here.
        return bool(self.accelerator.reduce(flag, reduction="sum").item() > 0)

    def _get_output_dir(self, trial) -> str:
        return str(self._checkpoint_root) if self._checkpoint_root is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        """The stock checkpoint, written under checkpoints/.incomplete/ and renamed into place once every process
        has written its part: a kill at any moment leaves the previous complete checkpoints or the new one."""
        final_root = Path(super()._get_output_dir(trial))
        staging_root = final_root / CHECKPOINT_STAGING_DIR
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        if self.args.should_save:
            remove_tree(staging_root)  # leftovers of a run killed while writing a checkpoint
        self.accelerator.wait_for_everyone()
        self._checkpoint_root = staging_root
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._checkpoint_root = None
        self.accelerator.wait_for_everyone()  # every process has written its share (e.g. rng_state_<rank>.pth)
        if self.args.should_save:
            publish_checkpoint(staging_root / name, final_root / name)
            rotate_checkpoints(str(final_root), save_total_limit=self.args.save_total_limit)
        self.accelerator.wait_for_everyone()


def answer_only_loss(model, inputs: dict, num_items_in_batch=None) -> torch.Tensor:
    """The causal-LM loss of transformers, with the vocabulary projection run only where a label is predicted.

    Answers are a few tokens of each example, and the output head (576 x 49152 for SmolLM2) is the largest matrix
    of a small model: projecting every prompt position and taking its log-softmax is most of the waste. Positions
    kept are those where any row of the batch predicts an answer token; the loss is reduced as transformers
    reduces it (summed and divided by `num_items_in_batch` when given, the mean over answer tokens otherwise), so
    loss and gradients equal the stock ones (tests/test_training_loss.py).
    """
    targets = next_token_targets(inputs["labels"])
    positions = (targets != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)
    model_inputs = {key: value for key, value in inputs.items() if key != "labels"}
    logits = model(**model_inputs, logits_to_keep=positions).logits
    flat_logits = logits.float().reshape(-1, logits.shape[-1])
    kept_targets = targets[:, positions].reshape(-1)
    if num_items_in_batch is None:
        return torch.nn.functional.cross_entropy(flat_logits, kept_targets, ignore_index=IGNORE_INDEX)
    total = torch.nn.functional.cross_entropy(flat_logits, kept_targets, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / torch.as_tensor(num_items_in_batch, device=total.device)


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """The label each position predicts (the next token's), IGNORE_INDEX at the end of each row."""
    return torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def accepts_logits_to_keep(model) -> bool:
    """Whether the model's forward can project a chosen set of positions only (most transformers LMs can)."""
    import inspect

    unwrapped = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(unwrapped.forward).parameters


def build_trainer(recipe, model, tokenizer, train_dataset, validation_dataset, collator, checkpoint_dir: Path):
    history = TrainingHistory()
    trainer = RecipeTrainer(
        model=model,
        args=build_training_arguments(recipe, checkpoint_dir),
        train_dataset=train_dataset,
        eval_dataset=validation_dataset,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=[ProgressAndGuard(history)],
    )
    trainer.history = history
    use_recipe_callbacks(trainer)
    return trainer, history


def load_training_data(recipe, tokenizer) -> tuple[tuple, str]:
    """The "sft" entry of the trainer table (lora/training/trainers.py): the encoded train and validation datasets,
    and what they hold, said before any score is taken."""
    train, validation = build_datasets(recipe, tokenizer)
    return (train, validation), f"{len(train)} training examples" + (
        f", {len(validation)} validation" if validation is not None else "")


def build_recipe_trainer(recipe, model, tokenizer, data: tuple, checkpoint_dir: Path):
    """The "sft" entry of the trainer table: the supervised trainer on `load_training_data`'s datasets."""
    train, validation = data
    return build_trainer(recipe, model, tokenizer, train, validation, build_collator(tokenizer, recipe["packing"]),
                         checkpoint_dir)


def use_recipe_callbacks(trainer) -> None:
    """Our progress bar instead of the stock ones, and the trackers of report_to held open until the run record is
    complete (lora.training.tracking)."""
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    hold_trackers(trainer)


def peak_memory_bytes() -> dict[str, int]:
    """Peak accelerator memory (when there is one) and peak resident memory of this process."""
    import resource

    peaks = {"cpu_max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if torch.cuda.is_available():
        peaks["cuda_max_allocated_bytes"] = int(torch.cuda.max_memory_allocated())
    return peaks


def gathered_state_dict(trainer) -> dict | None:
    """The whole model's state dict when FSDP or ZeRO-3 shards the weights, None when every process holds them all.

    Under FSDP/ZeRO-3 this is a collective: every process must call it (the result is complete on the main
    process), and the main process then saves with `model.save_pretrained(folder, state_dict=...)`; peft keeps
    the adapter's entries. Under DDP or one process `save_pretrained` reads the weights directly.
    """
    plugin = trainer.accelerator.state.deepspeed_plugin if trainer.is_deepspeed_enabled else None
    if not trainer.is_fsdp_enabled and not (plugin is not None and plugin.zero_stage == 3):
        return None
    return trainer.accelerator.get_state_dict(trainer.model_wrapped)

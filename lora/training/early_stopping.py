"""Early stopping: a recipe with `early_stopping_patience` stops once its watched metric has not improved for that
many evaluations in a row, and publishes the adapter of its best evaluated step.

The metric (`early_stopping_metric`) is the validation loss ("eval_loss", which the Trainer computes every
eval_steps) or an eval task's metric scored on the validation rows ("sentiment:accuracy": the harness the command
hands in, run on the validation data instead of the task's test file). Each improvement writes the adapter's
trainable weights to checkpoints/best-adapter/ (with early_stopping.json: the step, the value, the evaluations so
far); at the end they are loaded back before the after-training scores and the adapter is written. The run record's
"early_stopping" says which step was best and why training stopped.

Every checkpoint carries the stopping state as it was at its step (its early-stopping/ folder: the state and the best
weights so far, written before the checkpoint is renamed into place), and a run continued by --resume starts from
that, not from best-adapter/: a run killed after evaluating past its last checkpoint evaluates those steps again, and
must not count them twice.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch
from transformers import TrainerCallback

from lora.core.files import write_json_atomic
from lora.recipes.data_fields import LOWER_IS_BETTER

__all__ = ["BEST_ADAPTER_DIR", "CHECKPOINT_PART", "EarlyStopping", "attach_early_stopping"]

BEST_ADAPTER_DIR = "best-adapter"
CHECKPOINT_PART = "early-stopping"  # the stopping state inside each checkpoint-<step> folder
_WEIGHTS = "trainable_weights.pt"
_STATE = "early_stopping.json"


class EarlyStopping(TrainerCallback):
    """Watches one metric at every evaluation; keeps the best step's trainable weights on disk; stops the Trainer
    after `patience` evaluations without improvement."""

    def __init__(self, recipe, folder: Path, *, task_score=None):
        self.metric = recipe["early_stopping_metric"]
        self.patience = recipe["early_stopping_patience"]
        self.lower_is_better = self.metric.rpartition(":")[2] in LOWER_IS_BETTER
        self.folder = Path(folder) / BEST_ADAPTER_DIR
        self.task_score = task_score  # (model) -> float, for a TASK:METRIC; None for eval_loss
        self.model = None  # set by attach_early_stopping: the peft model whose trainable weights are kept
        self.state = {"metric": self.metric, "patience": self.patience, "best_step": None, "best_value": None,
                      "evaluations_without_improvement": 0, "evaluations": [], "stopped_at_step": None}

    def restore(self, checkpoint: Path | None) -> None:
        """Continue from the stopping state saved in `checkpoint` (a run resumed from it), or start afresh (None).

        A checkpoint without the state (written before the recipe asked for early stopping) starts it afresh too.
        """
        part = Path(checkpoint) / CHECKPOINT_PART if checkpoint is not None else None
        if part is None or not (part / _STATE).is_file():
            return
        self.state.update(json.loads((part / _STATE).read_text()))
        self.state.update(metric=self.metric, patience=self.patience)  # the recipe's, should it have changed
        if (part / _WEIGHTS).is_file():
            from accelerate import PartialState

            if PartialState().is_main_process:
                self.folder.mkdir(parents=True, exist_ok=True)
                _copy_replacing(part / _WEIGHTS, self.folder / _WEIGHTS)
            PartialState().wait_for_everyone()

    def write_into_checkpoint(self, checkpoint: Path) -> None:
        """Save the stopping state of this step into a checkpoint being written (main process; the trainer calls it
        before the checkpoint is renamed into place, lora.training.sft.RecipeTrainer._save_checkpoint)."""
        part = Path(checkpoint) / CHECKPOINT_PART
        part.mkdir(parents=True, exist_ok=True)
        write_json_atomic(part / _STATE, self.state)
        if self.state["best_step"] is not None:
            _copy_replacing(self.folder / _WEIGHTS, part / _WEIGHTS)

    def _better(self, value: float) -> bool:
        best = self.state["best_value"]
        if best is None:
            return math.isfinite(value)
        return value < best if self.lower_is_better else value > best

    def _value(self, metrics: dict) -> float:
        if self.task_score is None:
            return float(metrics["eval_loss"])
        from accelerate import PartialState
        from accelerate.utils import broadcast_object_list

        # Only the main process scores (the harness is not distributed); every process then takes its number, so
        # that all stop at the same step.
        value = [self.task_score(self.model) if PartialState().is_main_process else None]
        if PartialState().num_processes > 1:
            broadcast_object_list(value)
        return float(value[0])

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        value = self._value(metrics or {})
        step = state.global_step
        self.state["evaluations"].append([step, value])
        if self._better(value):
            self.state.update(best_step=step, best_value=value, evaluations_without_improvement=0)
            if state.is_world_process_zero:
                self._save_best()
        else:
            self.state["evaluations_without_improvement"] += 1
            if self.state["evaluations_without_improvement"] >= self.patience:
                self.state["stopped_at_step"] = step
                control.should_training_stop = True
        if state.is_world_process_zero:
            self.folder.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.folder / _STATE, self.state)
        return control

    def _trainable(self) -> dict[str, torch.nn.Parameter]:
        return {name: p for name, p in self.model.named_parameters() if p.requires_grad}

    def _save_best(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        weights = {name: p.detach().to("cpu", copy=True) for name, p in self._trainable().items()}
        partial = self.folder / f".{_WEIGHTS}.partial"
        torch.save(weights, partial)
        partial.replace(self.folder / _WEIGHTS)  # a kill leaves the previous best whole

    def publish_best(self, trainer) -> dict:
        """Load the best step's weights into the model (every process) and return the run record's entry."""
        from accelerate import PartialState

        PartialState().wait_for_everyone()
        record = dict(self.state)
        last = trainer.state.global_step
        if record["best_step"] is None:
            record["reason"] = (f"no evaluation ran before step {last} (eval_steps {trainer.args.eval_steps}); the "
                                "last step's adapter is published")
            return record
        if record["stopped_at_step"] is not None:
            record["reason"] = (f"{self.metric} did not improve for {self.patience} evaluation(s) after step "
                                f"{record['best_step']}; stopped at step {record['stopped_at_step']}")
        else:
            record["reason"] = f"trained to the end (step {last}); {self.metric} was best at step {record['best_step']}"
        weights = torch.load(self.folder / _WEIGHTS, map_location="cpu", weights_only=True)
        trainable = self._trainable()
        with torch.no_grad():
            for name, value in weights.items():
                trainable[name].copy_(value.to(trainable[name].device, trainable[name].dtype))
        record["published_step"] = record["best_step"]
        return record


def _copy_replacing(source: Path, target: Path) -> None:
    """Copy a file whole: a kill leaves the previous `target` or the new one, never a part."""
    partial = target.with_name(f".{target.name}.partial")
    shutil.copyfile(source, partial)
    partial.replace(target)


def attach_early_stopping(trainer, recipe, scoring, checkpoint_dir: Path,
                          resume_from: Path | None = None) -> EarlyStopping | None:
    """Add early stopping to a built trainer when the recipe asks for it (None otherwise).

    Args:
        scoring: the run's lora.training.run.Scoring, for a TASK:METRIC (scored on the validation rows).
        checkpoint_dir: the run's checkpoints folder; the best adapter is kept in its best-adapter/.
        resume_from: the checkpoint the run continues from (its stopping state is restored), or None.
    """
    if not recipe.get("early_stopping_patience"):
        return None
    task_score = None
    if recipe["early_stopping_metric"] != "eval_loss":
        task_score = _validation_task_score(recipe, scoring, trainer.processing_class, Path(checkpoint_dir))
    callback = EarlyStopping(recipe, checkpoint_dir, task_score=task_score)
    callback.restore(resume_from)
    callback.model = trainer.model
    trainer.add_callback(callback)
    return callback


def _validation_task_score(recipe, scoring, tokenizer, checkpoint_dir: Path):
    """(model) -> the task metric on the run's validation rows, through the harness the command handed in."""
    from lora.core.errors import UserError
    from lora.training.data_mixture import training_rows

    if scoring is None:
        raise UserError(f'recipe {recipe.name}: early_stopping_metric "{recipe["early_stopping_metric"]}" scores an '
                        'eval task, and this run has no scoring harness (use "eval_loss").')
    task, _, metric = recipe["early_stopping_metric"].partition(":")
    path = recipe["validation_path"]
    if not path:  # a validation_split: its rows, written once where the harness can read them
        path = checkpoint_dir / BEST_ADAPTER_DIR / "validation_rows.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = training_rows(recipe).validation
        path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))

    def score(model) -> float:
        results = scoring.evaluate(model, tokenizer, [task], prompt_template=recipe["prompt_template"],
                                   limit=recipe["eval_limit"], mode=recipe["eval_mode"], out_dir=None,
                                   data_overrides={task: str(path)}, progress=False)
        return float(results[task][metric])

    return score

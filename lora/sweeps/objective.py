"""A sweep's objective during training: scored on the validation set every few steps, reported to the Optuna trial,
and training stopped early when the pruner says the trial is losing.

The task metric is scored by the evaluation harness (eval.harness) on the recipe's validation rows (held out by
lora.training.data_mixture.training_rows, the rule training uses); validation loss is the Trainer's own evaluation.
"""

from __future__ import annotations

from collections.abc import Callable

from transformers import TrainerCallback

__all__ = ["ObjectiveReporter", "validation_scorer"]


def validation_scorer(objective, recipe) -> Callable[[object, object], float]:
    """A function (model, tokenizer) -> the objective's task metric on the recipe's validation rows.

    The rows are read and their targets checked once, before any training; each call scores them with the same
    prompt template and scoring mode (the recipe's eval_mode) the recipe's evaluation would use.
    """
    from eval.harness.evaluation import choose_mode, score_task, task_targets
    from eval.harness.tasks import load_tasks
    from lora.training.data_mixture import training_rows

    task = load_tasks()[objective.task]
    rows = training_rows(recipe).validation
    task_targets(task, rows)  # a validation target the task cannot score fails now, not after training
    mode = choose_mode(task, recipe["eval_mode"])

    def measure(model, tokenizer) -> float:
        previous = [(module, module.training) for module in model.modules()]
        model.eval()
        try:
            result, _ = score_task(model, tokenizer, task, rows, prompt_template=recipe["prompt_template"],
                                   mode=mode, batch_size=16, progress=False)
        finally:
            for module, was_training in previous:
                module.training = was_training
        return float(result[objective.metric])

    return measure


class ObjectiveReporter(TrainerCallback):
    """Reports the objective to an Optuna trial every `report_every_steps` steps and at the last step, and stops
    training when the trial's pruner says so (`pruned_at` then holds the step).

    A task metric is scored here with `measure(model, tokenizer)`; validation loss comes from the Trainer's own
    evaluation (the trial's recipe sets eval_steps), with one more evaluation asked for at the last step.
    """

    def __init__(self, objective, trial, measure: Callable[[object, object], float] | None = None,
                 on_report: Callable[[int], None] | None = None):
        self.objective = objective
        self.on_report = on_report  # e.g. record the steps trained so far, which a killed trial leaves behind
        self.trial = trial
        self.measure = measure
        self.values: list[tuple[int, float]] = []
        self.pruned_at: int | None = None

    def on_step_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        step, last = state.global_step, state.global_step >= state.max_steps
        if self.objective.is_loss:
            if last and step % self.objective.report_every_steps:
                control.should_evaluate = True  # the final value, when eval_steps does not land on the last step
            return control
        if (step % self.objective.report_every_steps == 0 or last) and not self._reported(step):
            self._report(step, self.measure(model, processing_class), control, last)
        return control

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if self.objective.is_loss and metrics and "eval_loss" in metrics and not self._reported(state.global_step):
            self._report(state.global_step, float(metrics["eval_loss"]), control,
                         state.global_step >= state.max_steps)
        return control

    def _reported(self, step: int) -> bool:
        return bool(self.values) and self.values[-1][0] == step

    def _report(self, step: int, value: float, control, last: bool) -> None:
        self.values.append((step, value))
        self.trial.report(value, step)
        if self.on_report is not None:
            self.on_report(step)
        # Pruning at the last step would save nothing: the trial then finishes with its final value.
        if not last and self.trial.should_prune():
            self.pruned_at = step
            control.should_training_stop = True

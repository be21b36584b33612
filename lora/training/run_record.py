"""The run record's figures as numbers, the same for every place that reports them (experiment trackers, the model
card): the scores of each eval task and the key figures of run_summary.json."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["KEY_FIGURES", "TaskFacts", "format_losses", "is_number", "score_figures", "tracker_figures"]

# Key figures of run_summary.json that trackers receive at the end of a run (peak memory and rewards are added).
KEY_FIGURES = ("steps", "epochs", "first_loss", "final_loss", "train_loss", "final_validation_loss", "tokens_seen",
               "answer_tokens_seen", "tokens_per_second", "answer_tokens_per_second", "train_seconds",
               "wall_time_seconds", "trainable_parameters", "total_parameters")


@dataclass(frozen=True)
class TaskFacts:
    """What the run record needs to know of an eval task (from eval/tasks.json, handed in by the command)."""

    metrics: tuple[str, ...] = ()  # the metrics the task declares; none: its accuracy
    homepage: str = ""
    description: str = ""


def is_number(value) -> bool:
    """A finite int or float (booleans are not figures)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def score_figures(scores: dict[str, dict], task_facts: Mapping[str, TaskFacts]) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} for the metrics each task declares in eval/tasks.json, from eval_before/eval_after.

    Bookkeeping numbers of a task result (n, seconds, batch size, tolerances) are not scores; a task that is not in
    `task_facts` (or declares no metrics) reports its accuracy.
    """
    figures = {}
    for name, result in scores.items():
        declared = task_facts[name].metrics if name in task_facts and task_facts[name].metrics else ("accuracy",)
        figures[name] = {metric: float(result[metric]) for metric in declared if is_number(result.get(metric))}
    return figures


def tracker_figures(summary: dict, task_facts: Mapping[str, TaskFacts]) -> dict[str, float]:
    """Everything a tracker receives at the end of the run, flat: run/<figure>, eval_before/<task>/<metric> and
    eval_after/<task>/<metric> (TensorBoard shows the last two as eval/before/... and eval/after/...)."""
    figures = {f"run/{key}": summary[key] for key in KEY_FIGURES if is_number(summary.get(key))}
    for key, value in (summary.get("peak_memory") or {}).items():
        if is_number(value):
            figures[f"run/peak_memory/{key}"] = value
    for key in ("first_reward", "final_reward"):
        if is_number((summary.get("rewards") or {}).get(key)):
            figures[f"run/{key}"] = summary["rewards"][key]
    for when in ("eval_before", "eval_after"):
        for task, metrics in score_figures(summary.get(when) or {}, task_facts).items():
            figures.update({f"{when}/{task}/{metric}": value for metric, value in metrics.items()})
    return figures


def format_losses(summary: dict) -> str:
    """"first -> final" loss of a run record, as the model card and the last milestone say it; a run whose log holds
    no loss (a run finished from a checkpoint at its last step logs none of its own) says so instead of failing."""
    first, final = summary.get("first_loss"), summary.get("final_loss")
    if not is_number(first) or not is_number(final):
        return "not logged"
    return f"{first:.4f} -> {final:.4f}"

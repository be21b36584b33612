"""The recipe checks of the data and stopping fields the schema cannot say alone: `dataset_path` or a `datasets`
mixture, each mixture entry's share, chat data with the chat template, and early stopping's metric and evaluation
schedule. The registry (lora/recipes/registry.py) asks `data_field_problems`; each problem names its field."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lora.core.errors import did_you_mean
from lora.core.strict_json import parse_json

__all__ = ["LOWER_IS_BETTER", "data_field_problems", "task_metrics"]

# Metrics where a smaller value is the better one (every other watched metric: higher is better).
LOWER_IS_BETTER = ("eval_loss", "mean_absolute_error")


def task_metrics(tasks_path: Path) -> dict[str, list[str]]:
    """{task: its metrics} from the evaluation registry, read as plain JSON ({} when it cannot be read)."""
    try:
        tasks = parse_json(Path(tasks_path).read_text(encoding="utf-8"))["tasks"]
    except (OSError, ValueError, KeyError, TypeError):  # the task registry reports its own problems when read
        return {}
    return {name: list(task.get("metrics") or ["accuracy"]) for name, task in tasks.items()}


def _dataset_problems(fields: Mapping[str, Any], given: set[str]) -> list[str]:
    datasets = fields.get("datasets")
    if not fields.get("dataset_path") and not datasets:
        return ['field "dataset_path" is required — a JSONL file of training rows (or "datasets": a list of '
                '{"path", "weight"} files to mix)']
    if fields.get("dataset_path") and datasets:
        return ['give either "dataset_path" (one file) or "datasets" (a mixture), not both']
    problems = []
    for index, entry in enumerate(datasets if isinstance(datasets, list) else []):
        if isinstance(entry, dict) and "weight" in entry and "max_examples" in entry:
            problems.append(f'field "datasets[{index}]": give "weight" or "max_examples", not both (a weight is a '
                            "share of the mixture, max_examples a fixed count)")
        if (isinstance(entry, dict) and entry.get("format") == "messages"
                and fields.get("prompt_template") != "chat"):
            problems.append(_chat_template_problem(f'datasets[{index}] ("format": "messages")',
                                                   fields.get("prompt_template")))
    return problems


def _chat_template_problem(what: str, template: Any) -> str:
    return (f'field "prompt_template": {what} holds chat rows, which train under the tokenizer\'s chat template; '
            'the adapter is scored and served under prompt_template, so it must be "chat" '
            f"(now {json.dumps(template)})")


def _early_stopping_problems(fields: Mapping[str, Any], given: set[str], tasks_path: Path) -> list[str]:
    problems = []
    patience = fields.get("early_stopping_patience")
    metric = fields.get("early_stopping_metric")
    if not patience:
        if "early_stopping_metric" in given:
            problems.append('field "early_stopping_metric" has no effect without early_stopping_patience (set '
                            "early_stopping_patience, e.g. 3, or drop early_stopping_metric)")
        return problems
    has_validation = bool(fields.get("validation_path")) or (fields.get("validation_split") or 0) > 0
    if not fields.get("eval_steps") or not has_validation:
        problems.append('field "early_stopping_patience" counts evaluations: it needs "eval_steps" (evaluate every '
                        "N steps) and a validation set (validation_path or validation_split)")
    if isinstance(metric, str) and metric != "eval_loss":
        task, _, name = metric.partition(":")
        known = task_metrics(tasks_path)
        if not name:
            problems.append(f'field "early_stopping_metric": "{metric}" is neither "eval_loss" nor "TASK:METRIC" '
                            '(e.g. "sentiment:accuracy")')
        elif known and task not in known:
            problems.append(f'field "early_stopping_metric": unknown task "{task}"{did_you_mean(task, known)} '
                            "(tasks are defined in eval/tasks.json)")
        elif known and name not in known[task] + ["accuracy"]:
            choices = sorted(set(known[task] + ["accuracy"]))
            problems.append(f'field "early_stopping_metric": task "{task}" has no metric "{name}"'
                            f"{did_you_mean(name, choices)} (its metrics: {', '.join(choices)})")
        if fields.get("trainer") not in ("sft", None):
            problems.append('field "early_stopping_metric": a task metric is scored on validation rows with '
                            '{"context", "target"}; a ' + str(fields.get("trainer")) + ' recipe watches "eval_loss"')
    return problems


def data_field_problems(fields: Mapping[str, Any], given: set[str], tasks_path: Path) -> list[str]:
    """The problems of a resolved recipe's data and early-stopping fields.

    Args:
        fields: the resolved recipe fields (defaults filled in).
        given: the fields the user set.
        tasks_path: the evaluation registry (eval/tasks.json), for early_stopping_metric's task and metric.
    """
    return _dataset_problems(fields, given) + _early_stopping_problems(fields, given, tasks_path)

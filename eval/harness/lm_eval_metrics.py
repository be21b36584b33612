"""The functions an exported lm-eval task calls (`!function lm_eval_metrics.NAME`): our parsing and our metrics.

`python eval/evaluate.py --export-lm-eval DIR` copies this file into DIR next to copies of lora/prompts/parsing.py and
eval/harness/metrics.py, which it loads by path (lm-eval imports a task's functions from the YAML's folder, with no
package
around them), so an exported folder scores with exactly the harness's rules and needs nothing from this repository.

lm-eval calls `process_*` once per document; each returns one item per metric, and the `aggregate_*` functions
turn a task's list of items into the harness's figure. lm-eval's own `f1` is binary: weighted and macro F1 over the
task's labels are aggregated here, with eval/harness/metrics.py.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

__all__ = [
    "aggregate_entity_accuracy",
    "aggregate_entity_f1",
    "aggregate_entity_precision",
    "aggregate_entity_recall",
    "aggregate_macro_f1",
    "aggregate_weighted_f1",
    "metrics",
    "parsing",
    "process_classification",
    "process_entities",
    "process_numeric",
    "process_text",
]


def _sibling(name: str):
    path = Path(__file__).with_name(f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"lora_recipes_export_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


parsing = _sibling("parsing")
metrics = _sibling("metrics")


def process_classification(doc: dict, results: list) -> dict:
    """multiple_choice: the label with the highest summed log-likelihood (the first of equal ones, as the harness)."""
    log_likelihoods = [result[0] for result in results]
    predicted = max(range(len(log_likelihoods)), key=log_likelihoods.__getitem__)
    choices = doc["choices"]
    item = (choices[doc["gold"]], choices[predicted], tuple(choices))
    return {"accuracy": float(predicted == doc["gold"]), "weighted_f1": item, "macro_f1": item}


def _classification(items: list, key: str) -> float:
    targets, predictions, labels = zip(*items, strict=True)
    return metrics.classification_scores(list(targets), list(predictions), labels[0])[key]


def aggregate_weighted_f1(items: list) -> float:
    return _classification(items, "weighted_f1")


def aggregate_macro_f1(items: list) -> float:
    return _classification(items, "macro_f1")


def process_entities(doc: dict, results: list) -> dict:
    """generate_until, entity lists: parsed as the harness parses them, scored over the whole task."""
    predicted = parsing.parse_entities(parsing.answer_text(results[0]), doc["entity_types"])
    item = ([tuple(entity) for entity in doc["expected"]], predicted)
    return {name: item for name in ("entity_f1", "accuracy", "entity_precision", "entity_recall")}


def _entities(items: list, key: str) -> float:
    targets, predictions = zip(*items, strict=True)
    return metrics.entity_scores(targets, predictions)[key]


def aggregate_entity_f1(items: list) -> float:
    return _entities(items, "entity_f1")


def aggregate_entity_accuracy(items: list) -> float:
    return _entities(items, "accuracy")


def aggregate_entity_precision(items: list) -> float:
    return _entities(items, "entity_precision")


def aggregate_entity_recall(items: list) -> float:
    return _entities(items, "entity_recall")


def process_numeric(doc: dict, results: list) -> dict:
    """generate_until, numbers: the first number of the answer, right within the task's tolerances."""
    predicted = parsing.parse_number(parsing.answer_text(results[0]))
    return {"accuracy": float(metrics.numbers_match(doc["expected"], predicted, doc["rel_tol"], doc["abs_tol"]))}


def process_text(doc: dict, results: list) -> dict:
    """generate_until, free text: normalised exact match and token F1."""
    predicted = parsing.normalise_text(parsing.answer_text(results[0]))
    return {"accuracy": float(doc["expected"] == predicted), "token_f1": metrics.token_f1(doc["expected"], predicted)}

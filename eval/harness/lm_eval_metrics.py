"""The functions an exported lm-eval task calls (`!function lm_eval_metrics.NAME`): our parsing and our metrics.

`python eval/evaluate.py --export-lm-eval DIR` copies this file into DIR next to copies of lora/prompts/parsing.py and
eval/harness/metrics.py, which it loads by path (lm-eval imports a task's functions from the YAML's folder, with no
package
around them), so an exported folder scores with exactly the harness's rules and needs nothing from this repository.

lm-eval calls `process_<kind>` once per document: it reads the document's answer as the harness does and returns
one value per metric the export reports (eval/harness/metrics.py's METRICS, the one table of metric names): a
"mean" metric's one-document score, or, for a "corpus" metric, the document's item that `aggregate_corpus` scores
over the whole task (lm-eval's own `f1` is binary: weighted and macro F1 over the task's labels are aggregated here,
with eval/harness/metrics.py).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

__all__ = [
    "aggregate_corpus",
    "document_results",
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
    sys.modules[spec.name] = module  # before it runs: its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


parsing = _sibling("parsing")
metrics = _sibling("metrics")


def document_results(kind: str, target, prediction, **options) -> dict:
    """What `process_results` returns for one document of a `kind` task: for every metric the table exports, its
    one-document score ("mean") or the item `aggregate_corpus` scores ("corpus").

    `options` are the kind's scoring settings (labels, rel_tol, abs_tol), as metrics.task_scores takes them.
    """
    one = metrics.task_scores(kind, [target], [prediction], **options)
    item = {"kind": kind, "target": target, "prediction": prediction, "options": options}
    return {metric.name: float(one[metric.name]) if metric.lm_eval == "mean" else {**item, "metric": metric.name}
            for metric in metrics.METRICS[kind] if metric.lm_eval}


def aggregate_corpus(items: list) -> float:
    """A "corpus" metric over a task's documents, computed once over all of them as the harness does."""
    first = items[0]
    scores = metrics.task_scores(first["kind"], [item["target"] for item in items],
                                 [item["prediction"] for item in items], **first["options"])
    return scores[first["metric"]]


def process_classification(doc: dict, results: list) -> dict:
    """multiple_choice: the label with the highest summed log-likelihood (the first of equal ones, as the harness)."""
    log_likelihoods = [result[0] for result in results]
    predicted = max(range(len(log_likelihoods)), key=log_likelihoods.__getitem__)
    choices = doc["choices"]
    return document_results("classification", choices[doc["gold"]], choices[predicted], labels=tuple(choices))


def process_entities(doc: dict, results: list) -> dict:
    """generate_until, entity lists: parsed as the harness parses them."""
    predicted = parsing.parse_entities(parsing.answer_text(results[0]), doc["entity_types"])
    return document_results("entities", [tuple(entity) for entity in doc["expected"]], predicted)


def process_numeric(doc: dict, results: list) -> dict:
    """generate_until, numbers: the first number of the answer, right within the task's tolerances."""
    predicted = parsing.parse_number(parsing.answer_text(results[0]))
    return document_results("numeric", doc["expected"], predicted, rel_tol=doc["rel_tol"], abs_tol=doc["abs_tol"])


def process_text(doc: dict, results: list) -> dict:
    """generate_until, free text: normalised exact match and token F1."""
    return document_results("text", doc["expected"], parsing.normalise_text(parsing.answer_text(results[0])))

"""Scores as pure functions of (targets, predictions): no models, no files, so every number in an eval JSON can be
recomputed from its predictions file. tests/test_eval_metrics.py checks them against scikit-learn.

A prediction of None (generate mode could not find an answer) or outside the label set is simply wrong: it never
counts as a class of its own, the way scikit-learn scores with `labels=` restricted to the task's labels.

METRICS is the one table of metric names, per task kind: the task registry (eval/harness/tasks.py, and the schema
eval/harness/task_schema.json, which tests/test_metric_table.py keeps equal to it), the lm-eval export
(eval/harness/lm_eval_export.py) and its scoring functions (eval/harness/lm_eval_metrics.py) all read it. A new
metric is one line there and its figure in the kind's score function below.

This module imports nothing from the project: an lm-eval export carries a copy of it and loads it by path.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "accuracy",
    "classification_scores",
    "default_metrics",
    "entity_scores",
    "Metric",
    "metric_names",
    "METRICS",
    "numbers_match",
    "numeric_scores",
    "per_label_f1",
    "scored_labels",
    "task_scores",
    "text_scores",
    "token_f1",
]


@dataclass(frozen=True)
class Metric:
    """One figure a task kind reports.

    Attributes:
        name: its key in the kind's scores (and in eval JSONs, run records, lm-eval results).
        default: reported when a task's `metrics` names none (in table order: the first is the headline).
        lm_eval: how an lm-eval export aggregates it over documents: "mean" of its one-document value (a mean over
            documents, such as accuracy; lm-eval adds its standard error), "corpus" (computed once over every
            document, as the harness does: F1 over entities or labels), or None (not exported).
    """

    name: str
    default: bool = True
    lm_eval: str | None = "mean"


METRICS: dict[str, tuple[Metric, ...]] = {
    "classification": (Metric("accuracy"), Metric("weighted_f1", lm_eval="corpus"),
                       Metric("macro_f1", lm_eval="corpus")),
    "entities": (Metric("entity_f1", lm_eval="corpus"), Metric("accuracy"),
                 Metric("entity_precision", default=False, lm_eval="corpus"),
                 Metric("entity_recall", default=False, lm_eval="corpus")),
    # The mean absolute error is over the answers where a number was found: no lm-eval aggregation says that.
    "numeric": (Metric("accuracy"), Metric("mean_absolute_error", default=False, lm_eval=None)),
    "text": (Metric("accuracy"), Metric("token_f1")),
}


def metric_names(kind: str) -> tuple[str, ...]:
    """Every metric a task of `kind` may report, in table order."""
    return tuple(metric.name for metric in METRICS[kind])


def default_metrics(kind: str) -> tuple[str, ...]:
    """The metrics a task of `kind` reports when it names none; the first is its headline."""
    return tuple(metric.name for metric in METRICS[kind] if metric.default)


def accuracy(targets: Sequence, predictions: Sequence) -> float:
    """Fraction of exact matches (0.0 for no examples)."""
    if not targets:
        return 0.0
    return sum(t == p for t, p in zip(targets, predictions, strict=True)) / len(targets)


def scored_labels(targets: Sequence[str], predictions: Sequence, labels: Sequence[str]) -> list[str]:
    """The task labels that occur as a target or a prediction, in the task's order.

    Labels absent from both carry no information; scikit-learn leaves them out by default, and so do we (a
    `--limit 20` run without any "neutral" row would otherwise get a macro F1 dragged down by a phantom class).
    """
    seen = set(targets) | set(predictions)
    return [label for label in labels if label in seen]


def per_label_f1(targets: Sequence[str], predictions: Sequence, labels: Sequence[str]) -> dict[str, dict]:
    """Precision, recall, F1 and support of each label (0.0 where a ratio is undefined, as scikit-learn does)."""
    scores = {}
    for label in labels:
        true_positive = sum(t == label and p == label for t, p in zip(targets, predictions, strict=True))
        predicted = sum(p == label for p in predictions)
        support = sum(t == label for t in targets)
        precision = true_positive / predicted if predicted else 0.0
        recall = true_positive / support if support else 0.0
        denominator = predicted + support
        f1 = 2 * true_positive / denominator if denominator else 0.0
        scores[label] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
    return scores


def classification_scores(targets: Sequence[str], predictions: Sequence, labels: Sequence[str]) -> dict:
    """accuracy, weighted F1 (by target support), macro F1 and per-label scores over the labels in play."""
    in_play = scored_labels(targets, predictions, labels)
    per_label = per_label_f1(targets, predictions, in_play)
    total_support = sum(score["support"] for score in per_label.values())
    weighted = sum(s["f1"] * s["support"] for s in per_label.values()) / total_support if total_support else 0.0
    macro = sum(s["f1"] for s in per_label.values()) / len(per_label) if per_label else 0.0
    return {
        "accuracy": accuracy(targets, predictions),
        "weighted_f1": weighted,
        "macro_f1": macro,
        "per_label": per_label,
    }


def entity_scores(targets: Sequence[Sequence[tuple]], predictions: Sequence[Sequence[tuple]]) -> dict:
    """Entity-level micro precision/recall/F1 over all examples, plus exact-set accuracy per example.

    Each example is a list of (name, type) pairs; duplicates count as often as they occur (multiset matching).
    """
    true_positive = predicted = expected = exact = 0
    for target, prediction in zip(targets, predictions, strict=True):
        target_counts, predicted_counts = Counter(target), Counter(prediction)
        true_positive += sum((target_counts & predicted_counts).values())
        predicted += sum(predicted_counts.values())
        expected += sum(target_counts.values())
        exact += target_counts == predicted_counts
    precision = true_positive / predicted if predicted else 0.0
    recall = true_positive / expected if expected else 0.0
    f1 = 2 * true_positive / (predicted + expected) if predicted + expected else 0.0
    return {
        "accuracy": exact / len(targets) if targets else 0.0,
        "entity_precision": precision,
        "entity_recall": recall,
        "entity_f1": f1,
    }


def numbers_match(target: float | None, prediction: float | None, rel_tol: float, abs_tol: float) -> bool:
    """|prediction - target| <= max(rel_tol * |target|, abs_tol); a missing number never matches."""
    if target is None or prediction is None:
        return False
    return abs(prediction - target) <= max(rel_tol * abs(target), abs_tol)


def numeric_scores(targets: Sequence, predictions: Sequence, rel_tol: float, abs_tol: float) -> dict:
    """Accuracy within tolerance, and the mean absolute error over the examples where a number was found."""
    correct = [numbers_match(t, p, rel_tol, abs_tol) for t, p in zip(targets, predictions, strict=True)]
    errors = [abs(p - t) for t, p in zip(targets, predictions, strict=True) if t is not None and p is not None]
    return {
        "accuracy": sum(correct) / len(correct) if correct else 0.0,
        "mean_absolute_error": sum(errors) / len(errors) if errors else None,
        "rel_tol": rel_tol,
        "abs_tol": abs_tol,
    }


def token_f1(target: str, prediction: str | None) -> float:
    """SQuAD-style token overlap F1 of two normalised strings (lowercase words; 1.0 when both are empty).

    Our offline stand-in for BERTScore, which FinLoRA uses for free-text answers (xbrl_term) but which needs a
    scoring model download.
    """
    target_tokens = target.lower().split()
    predicted_tokens = (prediction or "").lower().split()
    if not target_tokens and not predicted_tokens:
        return 1.0
    common = sum((Counter(target_tokens) & Counter(predicted_tokens)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted_tokens), common / len(target_tokens)
    return 2 * precision * recall / (precision + recall)


def text_scores(targets: Sequence[str], predictions: Sequence[str | None]) -> dict:
    """Exact-match accuracy (inputs already normalised) and mean token F1."""
    overlaps = [token_f1(t, p) for t, p in zip(targets, predictions, strict=True)]
    return {
        "accuracy": accuracy(targets, predictions),
        "token_f1": sum(overlaps) / len(overlaps) if overlaps else 0.0,
    }


def task_scores(kind: str, targets: Sequence, predictions: Sequence, *, labels: Sequence[str] = (),
                rel_tol: float = 0.01, abs_tol: float = 1e-6) -> dict:
    """The scores of a task of `kind` (every metric METRICS lists for it, and the kind's extra details).

    Args:
        kind: "classification", "entities", "numeric" or "text".
        targets, predictions: one per example, as the kind's score function takes them.
        labels: classification: the task's label set. rel_tol, abs_tol: numeric: the tolerances.
    """
    if kind == "classification":
        return classification_scores(targets, predictions, labels)
    if kind == "entities":
        return entity_scores(targets, predictions)
    if kind == "numeric":
        return numeric_scores(targets, predictions, rel_tol, abs_tol)
    if kind == "text":
        return text_scores(targets, predictions)
    raise ValueError(f"unknown task kind {kind!r} (known: {', '.join(METRICS)})")

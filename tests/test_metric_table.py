"""One table of metric names per task kind (eval/harness/metrics.py METRICS), every other list derived from it: the
task schema's enums equal it, the registry accepts a kind's metrics and refuses the others, every metric is a figure
of the kind's scores, and an lm-eval export (loaded by lm-eval itself) reports exactly the table's metrics with the
harness's values."""

from __future__ import annotations

import json
import random

import pytest

from eval.harness import metrics
from eval.harness.evaluation import prepare_tasks, task_targets
from eval.harness.lm_eval_export import export_tasks
from eval.harness.tasks import TASK_SCHEMA_PATH, TaskError, read_task_registry
from lora.models.loading import load_tokenizer
from lora.prompts import parsing

KINDS = list(metrics.METRICS)


def all_metric_names() -> list[str]:
    return list(dict.fromkeys(name for kind in KINDS for name in metrics.metric_names(kind)))


def test_the_task_schema_names_the_table_kinds_and_metrics():
    task = json.loads(TASK_SCHEMA_PATH.read_text())["$defs"]["task"]["properties"]
    assert task["kind"]["enum"] == KINDS
    assert task["metrics"]["items"]["enum"] == all_metric_names()


def _registry(tmp_path, kind: str, metric_list: list[str]):
    spec = {"path": "rows.jsonl", "kind": kind, "metrics": metric_list}
    if kind == "classification":
        spec["labels"] = ["a", "b"]
    path = tmp_path / "tasks.json"
    path.write_text(json.dumps({"tasks": {"t": spec}, "suites": {}}))
    return path


@pytest.mark.parametrize("kind", KINDS)
def test_the_registry_accepts_a_kinds_metrics_and_refuses_the_others(tmp_path, kind):
    read_task_registry(_registry(tmp_path, kind, list(metrics.metric_names(kind))))
    for other in sorted(set(all_metric_names()) - set(metrics.metric_names(kind))):
        with pytest.raises(TaskError, match=f'metric "{other}" does not apply to {kind} tasks'):
            read_task_registry(_registry(tmp_path, kind, [other]))


SAMPLES = {
    "classification": (["a", "b", "a"], ["a", "a", None], {"labels": ("a", "b")}),
    "entities": ([[("x", "ORG")], []], [[("x", "ORG"), ("y", "PER")], []], {}),
    "numeric": ([1.0, 2.0], [1.0, None], {"rel_tol": 0.01, "abs_tol": 0.0}),
    "text": (["net income", "revenue"], ["net income", "net"], {}),
}


@pytest.mark.parametrize("kind", KINDS)
def test_every_metric_of_the_table_is_a_figure_of_the_kinds_scores(kind):
    targets, predictions, options = SAMPLES[kind]
    scores = metrics.task_scores(kind, targets, predictions, **options)
    assert set(metrics.metric_names(kind)) <= set(scores)
    assert metrics.default_metrics(kind)[0] in scores  # the headline


def _synthetic_results(task, documents, rng):
    """What a model could have answered, per document: right for some, wrong or empty for others."""
    results = []
    for document in documents:
        if task.kind == "classification":
            results.append([(rng.uniform(-5, 0), False) for _ in document["choices"]])
        else:
            results.append([rng.choice([document["target"], "none", "", "12.5 and more", "Acme, ORG"])])
    return results


def _our_prediction(task, result):
    """The harness's reading of one answer (eval/harness/evaluation.py score_task)."""
    if task.kind == "classification":
        scores = [score for score, _ in result]
        return task.labels[max(range(len(scores)), key=scores.__getitem__)]
    text = parsing.answer_text(result[0])
    if task.kind == "entities":
        return parsing.parse_entities(text, task.entity_types)
    if task.kind == "numeric":
        return parsing.parse_number(text)
    return parsing.normalise_text(text)


def test_the_lm_eval_export_reports_the_table_with_the_harness_values(tmp_path, tiny_model_dir):
    from lm_eval.tasks import TaskManager

    rows = [{"context": f"Input: item {i}\nAnswer: ", "target": target}
            for i, target in enumerate(["net income", "revenue", "net income", "margin"])]
    text_file = tmp_path / "text.jsonl"
    text_file.write_text("".join(json.dumps(row) + "\n" for row in rows))
    prepared = prepare_tasks(["sentiment", "entities", "calc", "text_task"], limit=12,
                             data_overrides={"text_task": str(text_file)})
    assert sorted(task.kind for task, _ in prepared) == sorted(KINDS)  # every kind is exported
    items = [(task, task_rows, task_targets(task, task_rows)) for task, task_rows in prepared]
    export = tmp_path / "export"
    names = export_tasks(items, export, template="plain", tokenizer=load_tokenizer(str(tiny_model_dir)))
    loaded = TaskManager(include_path=str(export), include_defaults=False).load_task_or_group(names)
    rng = random.Random(0)
    for (task, _, targets), name in zip(items, names, strict=True):
        lm_eval_task = loaded[name]
        exported = [metric.name for metric in metrics.METRICS[task.kind] if metric.lm_eval]
        assert list(lm_eval_task.aggregation()) == exported
        documents = [json.loads(line) for line in (export / f"{name}.jsonl").read_text().splitlines()]
        results = _synthetic_results(task, documents, rng)
        per_document = [lm_eval_task.process_results(document, result)
                        for document, result in zip(documents, results, strict=True)]
        ours = metrics.task_scores(task.kind, targets, [_our_prediction(task, result) for result in results],
                                   labels=task.labels, rel_tol=task.rel_tol, abs_tol=task.abs_tol)
        for metric, aggregate in lm_eval_task.aggregation().items():
            theirs = aggregate([values[metric] for values in per_document])
            assert theirs == pytest.approx(ours[metric]), (task.name, metric)


def test_numeric_scores_default_to_one_percent_and_an_unknown_kind_is_named():
    """A numeric task that sets no tolerance: within 1% of the target (or 1e-6 of a zero target) is right."""
    scores = metrics.task_scores("numeric", [100.0, 100.0, 0.0, 0.0], [100.9, 102.0, 0.0000005, 0.5])
    assert (scores["accuracy"], scores["rel_tol"], scores["abs_tol"]) == (0.5, 0.01, 1e-6)
    with pytest.raises(ValueError) as refused:
        metrics.task_scores("ranking", [], [])
    assert str(refused.value) == "unknown task kind 'ranking' (known: classification, entities, numeric, text)"

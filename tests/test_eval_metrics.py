"""Metrics against scikit-learn, the parsing rules, and the task registry (pure functions: no model)."""

from __future__ import annotations

import json
import random

import pytest
from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support

from eval.harness import metrics
from eval.harness.tasks import TaskError, expand_task_names, infer_task, load_tasks, read_task_registry
from lora.prompts import parsing

LABELS = ["negative", "neutral", "positive"]


def random_predictions(seed: int, n: int, with_unparsed: bool):
    rng = random.Random(seed)
    targets = [rng.choice(LABELS) for _ in range(n)]
    choices = LABELS + ([None, "bullish"] if with_unparsed else [])
    predictions = [t if rng.random() < 0.5 else rng.choice(choices) for t in targets]
    return targets, predictions


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("with_unparsed", [False, True])
def test_classification_scores_match_sklearn(seed, with_unparsed):
    targets, predictions = random_predictions(seed, n=5 + 7 * seed, with_unparsed=with_unparsed)
    ours = metrics.classification_scores(targets, predictions, LABELS)
    # scikit-learn on the same inputs: unparsed predictions are a string outside the label set, and only labels
    # seen as target or prediction are scored (our rule, stated in metrics.scored_labels)
    sk_predictions = ["<unparsed>" if p is None else p for p in predictions]
    in_play = metrics.scored_labels(targets, predictions, LABELS)
    assert ours["accuracy"] == pytest.approx(accuracy_score(targets, sk_predictions))
    for average in ("weighted", "macro"):
        expected = f1_score(targets, sk_predictions, labels=in_play, average=average, zero_division=0)
        assert ours[f"{average}_f1"] == pytest.approx(expected)
    precision, recall, f1, support = precision_recall_fscore_support(
        targets, sk_predictions, labels=in_play, average=None, zero_division=0
    )
    for index, label in enumerate(in_play):
        scores = ours["per_label"][label]
        assert scores["precision"] == pytest.approx(precision[index]), label
        assert scores["recall"] == pytest.approx(recall[index]), label
        assert scores["f1"] == pytest.approx(f1[index]), label
        assert scores["support"] == support[index], label


def test_per_label_precision_and_recall_are_not_interchangeable():
    # "positive": predicted 3 times, right once (precision 1/3); 2 true rows, 1 found (recall 1/2)
    targets = ["positive", "positive", "negative", "negative"]
    predictions = ["positive", "negative", "positive", "positive"]
    scores = metrics.per_label_f1(targets, predictions, ["positive", "negative"])["positive"]
    assert scores["precision"] == pytest.approx(1 / 3) and scores["recall"] == pytest.approx(1 / 2)


def test_absent_labels_do_not_drag_macro_f1():
    scores = metrics.classification_scores(["positive", "negative"], ["positive", "negative"], LABELS)
    assert scores["macro_f1"] == 1.0 and "neutral" not in scores["per_label"]


def test_entity_scores_are_micro_over_entities_with_duplicates():
    targets = [[("acme", "ORG"), ("paris", "LOC")], [], [("ann lee", "PER"), ("ann lee", "PER")]]
    predictions = [[("acme", "ORG"), ("paris", "ORG")], [], [("ann lee", "PER")]]
    scores = metrics.entity_scores(targets, predictions)
    # tp = 1 + 0 + 1, predicted = 2 + 0 + 1, expected = 2 + 0 + 2
    assert scores["entity_precision"] == pytest.approx(2 / 3)
    assert scores["entity_recall"] == pytest.approx(2 / 4)
    assert scores["entity_f1"] == pytest.approx(2 * 2 / (3 + 4))
    assert scores["accuracy"] == pytest.approx(1 / 3)  # only the empty example matches exactly


def test_numeric_tolerance_is_relative_to_the_target_with_an_absolute_floor():
    assert metrics.numbers_match(100.0, 100.9, rel_tol=0.01, abs_tol=0.0)
    assert not metrics.numbers_match(100.0, 101.1, rel_tol=0.01, abs_tol=0.0)
    assert metrics.numbers_match(0.0, 0.004, rel_tol=0.01, abs_tol=0.005)
    assert not metrics.numbers_match(5.0, None, rel_tol=0.5, abs_tol=1.0)
    scores = metrics.numeric_scores([1.0, 2.0, 3.0], [1.0, None, 4.0], rel_tol=0.01, abs_tol=0.0)
    assert scores["accuracy"] == pytest.approx(1 / 3)
    assert scores["mean_absolute_error"] == pytest.approx(0.5)
    assert (scores["rel_tol"], scores["abs_tol"]) == (0.01, 0.0)  # the record says which tolerance was used


def test_token_f1():
    assert metrics.token_f1("net income", "net income") == 1.0
    assert metrics.token_f1("net income attributable", "net income") == pytest.approx(2 * 1 * (2 / 3) / (1 + 2 / 3))
    assert metrics.token_f1("revenue", None) == 0.0
    assert metrics.token_f1("", "") == 1.0 and metrics.token_f1("", "revenue") == 0.0
    # case and whitespace do not matter; repeated words count as often as they occur in both
    assert metrics.token_f1("Net  Income", "net income") == 1.0
    assert metrics.token_f1("a a b", "a c") == pytest.approx(2 * (1 / 2) * (1 / 3) / (1 / 2 + 1 / 3))


def test_text_scores_are_exact_match_accuracy_and_the_mean_token_f1_over_examples():
    targets = ["net income", "revenue", "total assets", "cash"]
    predictions = ["net income", "net revenue", None, "cash"]
    scores = metrics.text_scores(targets, predictions)
    overlaps = [metrics.token_f1(t, p) for t, p in zip(targets, predictions)]
    assert overlaps == pytest.approx([1.0, 2 / 3, 0.0, 1.0])
    assert scores["accuracy"] == pytest.approx(2 / 4)
    assert scores["token_f1"] == pytest.approx(sum(overlaps) / 4)  # the mean, neither the max nor the sum
    assert metrics.text_scores([], []) == {"accuracy": 0.0, "token_f1": 0.0}


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        ("positive", "positive"),
        ("The sentiment of this headline is Neutral.", "neutral"),
        # earliest mention wins, whatever the label order
        ("negative, not positive", "negative"),
        ("positive rather than negative", "positive"),
        # text after the LAST "Answer:" only
        ("Answer: negative\nAnswer: positive", "positive"),
        ("negative. answer:  neutral", "neutral"),
        # whole words only: "positively" is not "positive"
        ("positively negative", "negative"),
        ("no label here", None),
    ],
)
def test_parse_label_earliest_mention_after_last_answer(output, expected):
    assert parsing.parse_label(output, LABELS) == expected


def test_label_ties_go_to_the_longer_label_then_task_order():
    labels = ["positive", "positive outlook", "outlook"]
    assert parsing.match_label("positive outlook ahead", labels) == "positive outlook"
    assert parsing.match_label("positive outlook ahead", list(reversed(labels))) == "positive outlook"
    # same text, same span: only the order in the task can decide, and it does the same way every time
    assert parsing.match_label("Yes", ["yes", "YES"]) == "yes"
    assert parsing.match_label("Yes", ["YES", "yes"]) == "YES"


def test_yes_no_labels_do_not_match_inside_words():
    assert parsing.parse_label("Not sure. No.", ["Yes", "No"]) == "No"
    assert parsing.parse_label("The economy knows", ["Yes", "No"]) is None


@pytest.mark.parametrize(
    ("text", "number"),
    [("9.50", 9.5), ("$1,234.5 million", 1234.5), ("-3%", -3.0), ("about 0.77x", 0.77), ("Q3 sales 12", 12.0),
     ("ratio: .5", 0.5), ("EBITDA was 2100.4, up 3", 2100.4), ("none", None), ("\u22122.5", -2.5)],
)
def test_parse_number(text, number):
    assert parsing.parse_number(text) == number


def test_parse_entities():
    text = "Pellan Building, ORG; Carmen  Delgado, per; Acme, Inc., ORG; junk; Oslo, CITY"
    assert parsing.parse_entities(text, ["ORG", "PER", "LOC"]) == [
        ("pellan building", "ORG"), ("carmen delgado", "PER"), ("acme, inc.", "ORG")]
    assert parsing.parse_entities("none", ["ORG"]) == []
    assert parsing.parse_entities(" None. ", ["ORG"]) == []


def test_shipped_registry_is_valid_and_names_the_finlora_tasks():
    tasks = load_tasks()
    for name in ("sentiment", "entities", "calc", "fpb", "fiqa_sa", "tfns", "nwgi", "headline", "ner", "finer_ord",
                 "xbrl_term", "formula", "xbrl_tags", "xbrl_value", "xbrl_formula", "xbrl_formula_calc"):
        assert name in tasks
    assert tasks["sentiment"].default_mode == "choice" and tasks["calc"].default_mode == "generate"
    assert all(task.source for name, task in tasks.items() if name not in ("sentiment", "entities", "calc", "arith"))


def test_registry_problems_are_reported_together(tmp_path):
    registry = {
        "suites": {"s": ["sentimnt"]},
        "tasks": {
            "sentiment": {"path": "x.jsonl", "kind": "classification"},
            "calc": {"path": "y.jsonl", "kind": "numeric", "labels": ["a", "b"]},
        },
    }
    path = tmp_path / "tasks.json"
    path.write_text(json.dumps(registry))
    with pytest.raises(TaskError) as error:
        read_task_registry(path)
    message = str(error.value)
    assert 'tasks.sentiment: a classification task needs "labels"' in message
    assert 'tasks.calc: "labels" only applies to classification tasks' in message
    assert 'suites.s: unknown task "sentimnt" (did you mean "sentiment"?)' in message
    path.write_text(json.dumps({"suites": {}, "tasks": {"t": {"path": "x", "kind": "clasification"}}}))
    with pytest.raises(TaskError, match="tasks.t.kind"):
        read_task_registry(path)


def test_unknown_task_suggests_the_closest_name():
    with pytest.raises(TaskError, match='unknown task "fbp" \\(did you mean "fpb"\\?\\)'):
        expand_task_names(["fbp"])
    assert expand_task_names(["bundled", "sentiment"]) == ["sentiment", "entities", "calc"]
    assert expand_task_names(["mine"], extra_names=("mine",)) == ["mine"]


def test_ad_hoc_tasks_are_inferred_from_their_targets(tmp_path):
    labels = [{"context": "c", "target": t} for t in ["up", "down", "up", "down", "flat", "flat"]]
    task = infer_task("moves", tmp_path / "m.jsonl", labels)
    assert task.kind == "classification" and task.labels == ("down", "flat", "up")
    numbers = [{"context": "c", "target": t} for t in ["1.5", "2", "-3", "4,000"]]
    assert infer_task("n", tmp_path / "n.jsonl", numbers).kind == "numeric"
    text = [{"context": "c", "target": f"answer number {i}"} for i in range(4)]
    assert infer_task("t", tmp_path / "t.jsonl", text).kind == "text"


def test_metrics_of_no_examples_or_no_entities_are_zero_not_errors():
    assert metrics.entity_scores([], []) == {"accuracy": 0.0, "entity_precision": 0.0, "entity_recall": 0.0,
                                             "entity_f1": 0.0}
    # examples without any entity on either side: exact matches, but no entity was found or missed
    assert metrics.entity_scores([[], []], [[], []]) == {"accuracy": 1.0, "entity_precision": 0.0,
                                                         "entity_recall": 0.0, "entity_f1": 0.0}
    only_predicted = metrics.entity_scores([[]], [[("acme", "ORG")]])
    assert only_predicted["entity_precision"] == 0.0 and only_predicted["entity_recall"] == 0.0
    only_expected = metrics.entity_scores([[("acme", "ORG")]], [[]])
    assert only_expected["entity_precision"] == 0.0 and only_expected["entity_recall"] == 0.0
    assert metrics.numeric_scores([], [], rel_tol=0.01, abs_tol=0.0)["accuracy"] == 0.0
    no_numbers = metrics.numeric_scores([1.0, 2.0], [None, None], rel_tol=0.01, abs_tol=0.0)
    assert no_numbers["accuracy"] == 0.0 and no_numbers["mean_absolute_error"] is None
    assert metrics.numeric_scores([], [], rel_tol=0.01, abs_tol=0.0)["mean_absolute_error"] is None


def test_entity_f1_when_as_many_entities_are_predicted_as_expected():
    scores = metrics.entity_scores([[("acme", "ORG"), ("paris", "LOC")]], [[("acme", "ORG"), ("rome", "LOC")]])
    assert scores["entity_f1"] == pytest.approx(0.5) and scores["entity_precision"] == pytest.approx(0.5)


def test_a_number_exactly_at_the_tolerance_matches():
    assert metrics.numbers_match(100.0, 101.0, rel_tol=0.01, abs_tol=0.0)
    assert metrics.numbers_match(0.0, 0.5, rel_tol=0.01, abs_tol=0.5)
    assert metrics.numeric_scores([100.0], [99.0], rel_tol=0.01, abs_tol=0.0)["accuracy"] == 1.0


@pytest.mark.parametrize("score", [
    lambda t, p: metrics.accuracy(t, p),
    lambda t, p: metrics.per_label_f1(t, p, ["a", "b"]),
    lambda t, p: metrics.classification_scores(t, p, ["a", "b"]),
    lambda t, p: metrics.text_scores(t, p),
    lambda t, p: metrics.entity_scores([[(x, "T")] for x in t], [[(x, "T")] for x in p]),
    lambda t, p: metrics.numeric_scores([float(len(x)) for x in t], [float(len(x)) for x in p], 0.01, 0.0),
], ids=["accuracy", "per_label_f1", "classification", "text", "entity", "numeric"])
def test_predictions_and_targets_of_different_lengths_are_an_error(score):
    # a prediction file cut short must never be scored as if it were the whole test set
    with pytest.raises(ValueError):
        score(["a", "b", "a"], ["a", "b"])
    with pytest.raises(ValueError):
        score(["a", "b"], ["a", "b", "a"])


def test_a_label_only_predicted_is_scored_and_no_examples_score_zero():
    # "neutral" is never a target but is predicted: it is in play (precision 0, recall and F1 0, support 0)
    assert metrics.scored_labels(["positive"], ["neutral"], LABELS) == ["neutral", "positive"]
    per_label = metrics.per_label_f1(["positive"], ["neutral"], ["neutral", "positive"])
    assert per_label["neutral"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert metrics.per_label_f1([], [], ["neutral"])["neutral"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0,
                                                                    "support": 0}
    assert metrics.classification_scores([], [], LABELS) == {"accuracy": 0.0, "weighted_f1": 0.0, "macro_f1": 0.0,
                                                            "per_label": {}}

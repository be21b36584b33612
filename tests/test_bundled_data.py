"""The bundled datasets under data/: well-formed FinLoRA rows, sound targets, no train/test leak, reproducible.

Run: .venv/bin/pytest tests/test_bundled_data.py -q
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

DATA_DIR = Path(__file__).resolve().parents[1] / "data"
TASKS = ["sentiment", "entities", "calc"]
FILES = [f"{split}/{task}_{split}.jsonl" for task in TASKS for split in ("train", "test")]
# dpo pairs and the chat copy of the sentiment train rows (their own formats: not checked as FinLoRA rows below)
DERIVED = [f"preference/{task}_{split}.jsonl" for task in TASKS for split in ("train", "test")] + [
    "chat/sentiment_train.jsonl"]
# The RL task: training prompts, the warm start's format lesson, the fixed held-out test (data/README.md).
ARITH_FILES = {"train/arith_train.jsonl": 1000, "train/arith_format_train.jsonl": 200, "test/arith_test.jsonl": 300}
SENTIMENT_LABELS = {"negative", "neutral", "positive"}
DECIMALS_BY_RULE = {"Round to the nearest whole number.": 0, "Round to one decimal.": 1, "Round to two decimals.": 2}


def read_rows(relative: str) -> list[dict]:
    lines = (DATA_DIR / relative).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def input_text(context: str) -> str:
    return context.split("\nInput: ", 1)[1].rsplit("\nAnswer: ", 1)[0]


@pytest.mark.parametrize("relative", FILES)
def test_every_row_is_a_finlora_row(relative):
    rows = read_rows(relative)
    assert len(rows) == (600 if relative.startswith("train/") else 200)
    for number, row in enumerate(rows, start=1):
        where = f"{relative}:{number}"
        assert isinstance(row, dict) and sorted(row) == ["context", "target"], where
        assert isinstance(row["context"], str) and isinstance(row["target"], str) and row["target"], where
        assert row["context"].startswith("Instruction: "), where
        assert row["context"].endswith("Answer: ") and row["context"].endswith("\nAnswer: "), where
        assert "\nInput: " in row["context"], where


@pytest.mark.parametrize("split", ["train", "test"])
def test_sentiment_labels_are_the_three_and_balanced(split):
    targets = [row["target"] for row in read_rows(f"{split}/sentiment_{split}.jsonl")]
    assert set(targets) == SENTIMENT_LABELS
    for label in SENTIMENT_LABELS:
        assert targets.count(label) >= 0.25 * len(targets), label


@pytest.mark.parametrize("task", TASKS)
def test_no_context_repeats_within_or_across_splits(task):
    train = [row["context"] for row in read_rows(f"train/{task}_train.jsonl")]
    test = [row["context"] for row in read_rows(f"test/{task}_test.jsonl")]
    assert len(set(train)) == len(train)
    assert len(set(test)) == len(test)
    assert not set(train) & set(test)


@pytest.mark.parametrize("split", ["train", "test"])
def test_calc_targets_are_plain_numbers_rounded_as_asked(split):
    for number, row in enumerate(read_rows(f"{split}/calc_{split}.jsonl"), start=1):
        target = row["target"]
        assert re.fullmatch(r"-?\d+(\.\d+)?", target), f"{split}:{number}: {target!r}"
        float(target)
        rule = next(rule for rule in DECIMALS_BY_RULE if rule in row["context"])
        decimals = len(target.split(".")[1]) if "." in target else 0
        assert decimals == DECIMALS_BY_RULE[rule], f"{split}:{number}: {target!r} vs {rule!r}"


@pytest.mark.parametrize("split", ["train", "test"])
def test_entity_targets_name_typed_entities_of_the_sentence_in_order(split):
    rows = read_rows(f"{split}/entities_{split}.jsonl")
    assert any(row["target"] == "none" for row in rows)
    for number, row in enumerate(rows, start=1):
        if row["target"] == "none":
            continue
        sentence = input_text(row["context"])
        pairs = [pair.rsplit(", ", 1) for pair in row["target"].split("; ")]
        assert 1 <= len(pairs) <= 4, f"{split}:{number}"
        assert all(kind in ("ORG", "PER", "LOC") for _, kind in pairs), f"{split}:{number}"
        positions = [sentence.find(entity) for entity, _ in pairs]
        assert -1 not in positions and positions == sorted(positions), f"{split}:{number}: {row['target']!r}"


def test_regenerating_reproduces_the_committed_files_byte_for_byte(tmp_path):
    subprocess.run([sys.executable, str(DATA_DIR / "make_datasets.py"), "--out", str(tmp_path)], check=True,
                   capture_output=True)
    written = sorted(str(path.relative_to(tmp_path)) for path in tmp_path.rglob("*.jsonl"))
    assert written == sorted(FILES + DERIVED + list(ARITH_FILES))
    for relative in FILES + DERIVED + list(ARITH_FILES):
        assert (tmp_path / relative).read_bytes() == (DATA_DIR / relative).read_bytes(), relative


def test_arith_rows_are_whole_number_answers_to_their_own_question():
    contexts = []
    for relative, count in ARITH_FILES.items():
        rows = read_rows(relative)
        assert len(rows) == count, relative
        for number, row in enumerate(rows, start=1):
            where = f"{relative}:{number}"
            assert sorted(row) == ["context", "target"] and row["context"].endswith("\nAnswer: "), where
            question = input_text(row["context"])
            amounts = [int(n) for n in re.findall(r"\$(\d+)", question)]
            percent = re.search(r"(\d+)%", question)
            if percent:
                expected = amounts[0] * int(percent.group(1)) / 100
            elif "received" in question or "total" in question:
                expected = sum(amounts)
            else:
                expected = amounts[0] - amounts[1]
            assert re.fullmatch(r"\d+", row["target"]) and int(row["target"]) == expected, where
            contexts.append(row["context"])
    assert len(set(contexts)) == len(contexts)  # no problem in two files, nor twice in one

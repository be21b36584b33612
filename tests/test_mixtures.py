"""Dataset mixtures: the counts each file gives, drawn the same way for the same seed, recorded per file; bad
mixture fields are refused naming them; FinLoRA's one-file recipes read their file as before."""

from __future__ import annotations

import json

import pytest

from conftest import REPO_ROOT
from lora.core.errors import RecipeError
from lora.prompts.mixtures import DatasetSpec, mix_datasets, mixture_counts
from lora.recipes.registry import resolve_recipe
from lora.training.data_mixture import training_rows

SENTIMENT = str(REPO_ROOT / "data/train/sentiment_train.jsonl")  # 600 rows
ENTITIES = str(REPO_ROOT / "data/train/entities_train.jsonl")  # 600 rows


def test_weights_share_the_rows_without_repeating_one():
    specs = [DatasetSpec("a", weight=2), DatasetSpec("b", weight=1)]
    assert mixture_counts([600, 600], specs) == [600, 300]  # a runs out first: 2/3 of 900
    assert mixture_counts([100, 600], specs) == [100, 50]
    capped = [DatasetSpec("a", max_examples=10), DatasetSpec("b"), DatasetSpec("c", weight=1)]
    assert mixture_counts([600, 40, 7], capped) == [10, 40, 7]


def test_a_mixture_draws_the_right_counts_deterministically_by_the_seed():
    specs = [DatasetSpec(SENTIMENT, weight=3), DatasetSpec(ENTITIES, weight=1)]
    first, again, other = (mix_datasets(specs, seed) for seed in (42, 42, 7))
    assert [first.sources.count(i) for i in (0, 1)] == [600, 200]
    assert first.rows == again.rows and first.rows != other.rows
    entity_rows = [row for row, source in zip(first.rows, first.sources) if source == 1]
    assert len({row["context"] for row in entity_rows}) == 200  # no row repeated


def recipe(tmp_path, **fields):
    registry = tmp_path / "finetune_configs.json"
    registry.write_text(json.dumps({"r": {"base_model": "m", **fields}}))
    return resolve_recipe("r", registry)


def test_the_run_record_lists_each_file_with_rows_read_and_used(tmp_path):
    from lora.prompts.rows import file_sha256

    mixed = recipe(tmp_path, datasets=[{"path": SENTIMENT, "weight": 2}, {"path": ENTITIES, "weight": 1}],
                   validation_split=0.1)
    rows = training_rows(mixed)
    record = {entry["path"]: entry for entry in rows.record}
    assert record[SENTIMENT]["rows_read"] == record[ENTITIES]["rows_read"] == 600
    assert record[SENTIMENT]["sha256"] == file_sha256(SENTIMENT)
    used = record[SENTIMENT]["rows_used"] + record[ENTITIES]["rows_used"]
    assert used == len(rows.train) == 900 - len(rows.validation) == 810
    assert abs(record[SENTIMENT]["rows_used"] / used - 2 / 3) < 0.03  # the split keeps the weights
    assert record[SENTIMENT]["weight"] == 2 and record[SENTIMENT]["format"] == "finlora"


def test_a_one_file_recipe_reads_its_file_as_before(tmp_path):
    from datasets import Dataset

    from lora.prompts.rows import load_rows

    one = recipe(tmp_path, dataset_path=SENTIMENT, max_train_examples=50)
    before = Dataset.from_list(load_rows(SENTIMENT)).shuffle(seed=42).select(range(50))  # the runner's old order
    assert training_rows(one).train == before.to_list()


@pytest.mark.parametrize(("fields", "fragment"), [
    ({}, '"dataset_path" is required'),
    ({"dataset_path": SENTIMENT, "datasets": [{"path": SENTIMENT}]}, 'either "dataset_path"'),
    ({"datasets": []}, 'field "datasets"'),
    ({"datasets": [{"path": SENTIMENT, "weight": 1, "max_examples": 3}]}, 'field "datasets[0]": give "weight"'),
    ({"datasets": [{"path": SENTIMENT, "weight": 0}]}, "datasets.0.weight"),
    ({"datasets": [{"path": SENTIMENT, "weigth": 1}]}, "weigth"),
    ({"datasets": [{"path": SENTIMENT, "format": "chat"}]}, '"chat" is not allowed'),
    ({"datasets": [{"path": SENTIMENT, "format": "messages"}]}, 'field "prompt_template"'),
])
def test_bad_mixture_fields_are_refused_naming_them(tmp_path, fields, fragment):
    with pytest.raises(RecipeError) as caught:
        recipe(tmp_path, **fields)
    assert fragment in str(caught.value)


def test_a_missing_mixture_file_exits_2_naming_it(tmp_path, capsys):
    from lora.finetune import main

    registry = tmp_path / "finetune_configs.json"
    registry.write_text(json.dumps({"r": {"base_model": "m", "datasets": [{"path": SENTIMENT, "weight": 1},
                                                                          {"path": "gone.jsonl", "weight": 1}]}}))
    assert main(["r", "--registry", str(registry), "--output-dir", str(tmp_path / "out")]) == 2
    assert "gone.jsonl does not exist" in capsys.readouterr().err


def test_a_mixture_entry_resolves_beside_the_registry_and_a_symlink_loop_is_named(tmp_path):
    (tmp_path / "rows.jsonl").write_text(json.dumps({"context": "a", "target": "b"}) + "\n")
    resolved = recipe(tmp_path, datasets=[{"path": "rows.jsonl", "weight": 1}])
    assert resolved["datasets"][0]["path"] == str(tmp_path / "rows.jsonl")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    with pytest.raises(RecipeError, match=r'field "datasets\[1\].path": loop is a symlink loop'):
        recipe(tmp_path, datasets=[{"path": "rows.jsonl", "weight": 1}, {"path": "loop", "weight": 1}])


@pytest.mark.parametrize("row", [
    {"messages": [{"role": "user", "content": "x" * 900}, {"role": "assistant", "content": "y" * 200}]},
    {"prompt": "x" * 900, "chosen": "positive", "rejected": "y" * 200},
])
def test_a_chat_or_preference_row_far_over_max_seq_length_is_refused_with_file_and_line(tmp_path, row):
    from lora.core.errors import DataError
    from lora.prompts.data_formats import read_data_file
    from lora.prompts.rows import max_row_chars

    short = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    if "prompt" in row:
        short = {"prompt": "hi", "chosen": "yes", "rejected": "no"}
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps(short) + "\n" + json.dumps(row) + "\n")
    assert len(read_data_file(data, max_seq_length=10_000).rows) == 2
    assert len(read_data_file(data).rows) == 2  # scoring reads without the training bound
    with pytest.raises(DataError, match=rf"rows.jsonl:2: the row holds 1\d\d\d characters, over the "
                                        rf"{max_row_chars(16)} allowed for max_seq_length 16"):
        read_data_file(data, max_seq_length=16)
    mixture = recipe(tmp_path, datasets=[{"path": str(data), "weight": 1}], max_seq_length=16)
    with pytest.raises(DataError, match=r"rows.jsonl:2: the row holds"):
        training_rows(mixture)

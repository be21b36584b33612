"""Inputs a careless or hostile user hands the tool get exit code 2 and one message naming the place (issue 24, items
9-12 and 14): NaN/Infinity and floats where integers belong, symlink loops, registries nested past the JSON
reader, rows far longer than the context, repeated keys; and `--list` stays linear in the registry's size.

Run: .venv/bin/python -m pytest tests/test_hostile_inputs.py -q
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

import lora.recipes.registry as registry_module
from conftest import REPO_ROOT
from eval.evaluate import main as evaluate
from lora.core.errors import DataError, RecipeError, UserError
from lora.core.strict_json import JSONInputError, parse_json
from lora.finetune import main as finetune
from lora.prompts.rows import load_rows, max_row_chars
from lora.recipes.registry import list_recipes, resolve_recipe

TRAIN = REPO_ROOT / "data/train/sentiment_train.jsonl"


def _recipe(tiny_model_dir: Path, **fields) -> dict:
    return {"base_model": str(tiny_model_dir), "dataset_path": str(TRAIN), "quant_bits": None, "max_steps": 1,
            "batch_size": 2, "lora_r": 4, "lora_alpha": 8, **fields}


@pytest.fixture()
def registry(tmp_path, tiny_model_dir) -> Path:
    path = tmp_path / "finetune_configs.json"
    path.write_text(json.dumps({"tiny": _recipe(tiny_model_dir)}, indent=2))
    return path


def _dry_run_error(registry: Path, capsys, *overrides: str) -> str:
    code = finetune(["tiny", "--registry", str(registry), "--dry-run",
                     *[arg for item in overrides for arg in ("--set", item)]])
    captured = capsys.readouterr()
    assert code == 2, captured.out[-400:]
    assert "Traceback" not in captured.err
    return captured.err


# ---- item 9: NaN, Infinity and floats for integers fail --dry-run, not the run -------------------------------------

@pytest.mark.parametrize("assignment", ["learning_rate=NaN", "warmup_ratio=NaN", "max_grad_norm=NaN",
                                        "max_grad_norm=Infinity", "lora_alpha=-Infinity", "learning_rate=1e999"])
def test_nan_and_infinity_in_set_are_schema_errors(registry, capsys, assignment):
    key, value = assignment.split("=")
    error = _dry_run_error(registry, capsys, assignment)
    assert f'field "{key}": \'{value}\' is not of type \'number\'' in error
    assert "NaN and Infinity are not numbers a recipe accepts; give a finite number, e.g. the default" in error


@pytest.mark.parametrize(("assignment", "nearest"), [("lora_r=1e2", "100"), ("seed=1e30", "4294967295"),
                                                     ("max_steps=3.0", "3"), ("seed=4294967296", "4294967295")])
def test_integers_must_be_integers_within_what_the_stack_accepts(registry, capsys, assignment, nearest):
    error = _dry_run_error(registry, capsys, assignment)
    assert f'field "{assignment.split("=")[0]}"' in error
    assert f"nearest valid value: {nearest}" in error


def test_the_largest_seed_numpy_accepts_still_resolves(registry):
    assert resolve_recipe("tiny", registry, ["seed=4294967295"])["seed"] == 4294967295


@pytest.mark.parametrize(("literal", "shown"), [("NaN", "NaN"), ("Infinity", "Infinity"), ("1e999", "1e999")])
def test_nan_in_the_registry_file_names_line_and_column(tmp_path, tiny_model_dir, literal, shown):
    text = json.dumps({"tiny": _recipe(tiny_model_dir, max_grad_norm=1.5)}, indent=2).replace("1.5", literal)
    path = tmp_path / "finetune_configs.json"
    path.write_text(text)
    line = next(number for number, row in enumerate(text.splitlines(), 1) if literal in row)
    with pytest.raises(RecipeError, match=rf"finetune_configs.json:{line}:\d+: {shown} is not a finite number"):
        resolve_recipe("tiny", path)


def test_nan_in_the_eval_task_registry_is_refused_with_its_line(tmp_path, capsys):
    tasks = json.loads((REPO_ROOT / "eval/tasks.json").read_text())
    name = next(n for n, spec in tasks["tasks"].items() if spec["kind"] == "numeric")
    tasks["tasks"][name]["rel_tol"] = 0.25
    path = tmp_path / "tasks.json"
    path.write_text(json.dumps(tasks, indent=2).replace("0.25", "NaN"))
    assert evaluate(["--list", "--task-registry", str(path)]) == 2
    assert f"task registry {path}:" in capsys.readouterr().err


# ---- item 10: symlink loops and a registry nested 100k levels deep ------------------------------------------------

@pytest.mark.parametrize("field", ["dataset_path", "init_adapter"])
def test_a_symlink_loop_is_a_recipe_problem_and_list_shows_it(tmp_path, tiny_model_dir, capsys, field):
    (tmp_path / "loop_a").symlink_to(tmp_path / "loop_b")
    (tmp_path / "loop_b").symlink_to(tmp_path / "loop_a")
    path = tmp_path / "finetune_configs.json"
    path.write_text(json.dumps({"good": _recipe(tiny_model_dir), "bad": _recipe(tiny_model_dir, **{field: "loop_a"})}))
    assert finetune(["bad", "--registry", str(path), "--dry-run"]) == 2
    error = capsys.readouterr().err
    assert f'field "{field}": loop_a is a symlink loop' in error and "Traceback" not in error
    assert finetune(["--list", "--registry", str(path)]) == 0
    table = capsys.readouterr().out
    assert "good" in table and "loop_a is a symlink loop" in table


def test_a_data_file_that_is_a_symlink_loop_is_named_as_one(tmp_path):
    (tmp_path / "loop_a").symlink_to(tmp_path / "loop_b")
    (tmp_path / "loop_b").symlink_to(tmp_path / "loop_a")
    with pytest.raises(DataError, match="is a symlink loop"):
        load_rows(tmp_path / "loop_a")


def test_a_registry_that_is_a_symlink_loop(tmp_path, capsys):
    (tmp_path / "loop_a").symlink_to(tmp_path / "loop_b")
    (tmp_path / "loop_b").symlink_to(tmp_path / "loop_a")
    assert finetune(["--list", "--registry", str(tmp_path / "loop_a")]) == 2
    assert "is a symlink loop" in capsys.readouterr().err


def test_a_registry_nested_100k_levels_deep(tmp_path, capsys):
    path = tmp_path / "deep.json"
    path.write_text('{"tiny": ' + "[" * 100_000 + "]" * 100_000 + "}")
    assert finetune(["--list", "--registry", str(path)]) == 2
    error = capsys.readouterr().err
    assert "Traceback" not in error and "levels deep, past what the JSON reader can follow" in error


def test_a_data_row_nested_deeply_names_its_line(tmp_path):
    data = tmp_path / "deep.jsonl"
    data.write_text('{"context": "a", "target": "b"}\n{"context": ' + "[" * 50_000 + "]" * 50_000 + "}\n")
    with pytest.raises(DataError, match=rf"{data}:2: nested 50001 levels deep"):
        load_rows(data)


# ---- item 11: a row far longer than the context is refused before any model loads ---------------------------------

def test_a_row_far_over_max_seq_length_is_refused_with_file_and_line(tmp_path):
    data = tmp_path / "long.jsonl"
    good = json.dumps({"context": "Input: shares rose\nAnswer: ", "target": "positive"})
    data.write_text(good + "\n" + json.dumps({"context": "x" * max_row_chars(16), "target": "positive"}) + "\n")
    assert len(load_rows(data, max_seq_length=10_000)) == 2
    with pytest.raises(DataError, match=rf"{data}:2: the row holds {max_row_chars(16) + 8} characters, over the "
                                        rf"{max_row_chars(16)} allowed for max_seq_length 16"):
        load_rows(data, max_seq_length=16)


def test_a_run_with_a_huge_row_exits_2_before_writing_anything(tmp_path, tiny_model_dir, capsys):
    data = tmp_path / "long.jsonl"
    data.write_text(TRAIN.read_text() + json.dumps({"context": "y" * 5_000, "target": "neutral"}) + "\n")
    path = tmp_path / "finetune_configs.json"
    path.write_text(json.dumps({"tiny": _recipe(tiny_model_dir, dataset_path=str(data), max_seq_length=16)}))
    out = tmp_path / "out"
    assert finetune(["tiny", "--registry", str(path), "--output-dir", str(out)]) == 2
    assert f"{data}:{len(TRAIN.read_text().splitlines()) + 1}: the row holds 5007 characters" in capsys.readouterr().err
    assert not out.exists()


# ---- item 14: a key given twice ------------------------------------------------------------------------------------

def test_a_recipe_given_twice_is_an_error_naming_it_and_its_line(tmp_path, tiny_model_dir):
    one = json.dumps(_recipe(tiny_model_dir))
    path = tmp_path / "finetune_configs.json"
    path.write_text('{\n"tiny": ' + one + ',\n"other": ' + one + ',\n"tiny": ' + one + "\n}\n")
    with pytest.raises(RecipeError, match=r'finetune_configs.json:4:1: key "tiny" is given twice in one object'):
        list_recipes(path)


def test_a_field_given_twice_in_one_recipe_is_an_error(tmp_path, tiny_model_dir):
    path = tmp_path / "finetune_configs.json"
    text = json.dumps({"a": _recipe(tiny_model_dir), "b": _recipe(tiny_model_dir)}, indent=2)
    path.write_text(text.replace('"lora_r": 4,', '"lora_r": 4,\n    "lora_r": 16,', 1))
    with pytest.raises(RecipeError, match=r':\d+:5: key "lora_r" is given twice'):
        resolve_recipe("b", path)


def test_strict_json_rules():
    assert parse_json('{"a": [1, 2.5, "\\ud83d\\ude00"], "b": {"a": 1}}') == {"a": [1, 2.5, "😀"], "b": {"a": 1}}
    for text, fragment in [('{"a": 1,\n "a": 2}', '2:2: key "a" is given twice'),
                           ('["ok", "\\ud800x"]', "1:8: this string holds a lone UTF-16 surrogate"),
                           ("[1, -Infinity]", "1:5: -Infinity is not a finite number"),
                           ("[" + "1" * 2000 + "]", "1:2: a number of 2000 digits"),
                           ("[1,", "1:4: not valid JSON")]:
        with pytest.raises(JSONInputError) as caught:
            parse_json(text)
        assert str(caught.value).startswith(fragment), str(caught.value)


# ---- item 12: --list is linear in the registry's size --------------------------------------------------------------

def _counted_list(monkeypatch, path: Path) -> dict[str, int]:
    """list_recipes(path) with two counters: recipe names checked (once per name per registry read) and deep copies
    of a recipe as written (once per link of an `extends` chain it is merged into)."""
    counts = {"names_checked": 0, "recipes_copied": 0}
    raw_recipes: set[int] = set()
    read, check, deepcopy = registry_module.read_registry, registry_module.check_recipe_name, copy.deepcopy

    def reading(*args, **kwargs):
        registry_path, raw = read(*args, **kwargs)
        raw_recipes.update(id(recipe) for recipe in raw.values())
        return registry_path, raw

    def checking(*args, **kwargs):
        counts["names_checked"] += 1
        return check(*args, **kwargs)

    def copying(value, *args, **kwargs):
        counts["recipes_copied"] += id(value) in raw_recipes
        return deepcopy(value, *args, **kwargs)

    monkeypatch.setattr(registry_module, "read_registry", reading)
    monkeypatch.setattr(registry_module, "check_recipe_name", checking)
    monkeypatch.setattr(copy, "deepcopy", copying)
    rows = list_recipes(path)
    monkeypatch.undo()
    assert len(rows) == sum(1 for row in rows if "problem" not in row)  # every recipe resolved
    return counts


@pytest.mark.parametrize("shape", ["flat", "chain"])
def test_list_does_work_linear_in_the_number_of_recipes(tmp_path, tiny_model_dir, monkeypatch, shape):
    counts = {}
    for size in (50, 200):
        recipes = {"_base": _recipe(tiny_model_dir)}
        for i in range(size):
            parent = "_base" if shape == "flat" or i == 0 else f"r{i - 1}"
            recipes[f"r{i}"] = {"extends": parent, "lora_r": 4 + i % 4}
        path = tmp_path / f"{shape}{size}.json"
        path.write_text(json.dumps(recipes))
        counts[size] = _counted_list(monkeypatch, path)
    for key in ("names_checked", "recipes_copied"):
        # Linear: 4x the recipes, 4x the work (plus the shared base). Quadratic would be about 16x.
        assert counts[200][key] <= 4 * counts[50][key] + 4, (key, counts)


def test_an_adapter_config_with_a_repeated_key_or_nan_names_its_line(tmp_path):
    from lora.adapters.folders import read_adapter_records

    folder = tmp_path / "adapter"
    folder.mkdir()
    config = folder / "adapter_config.json"
    config.write_text('{"peft_type": "LORA",\n "r": 8,\n "lora_alpha": NaN}')
    with pytest.raises(UserError, match=rf"{config}:3:16 is not valid JSON \(.*\): NaN is not a finite number"):
        read_adapter_records(folder)
    config.write_text('{"peft_type": "LORA",\n "r": 8,\n "r": 16}')
    with pytest.raises(UserError, match=rf'{config}:3:2 is not valid JSON \(.*\): key "r" is given twice'):
        read_adapter_records(folder)


def test_a_float_for_an_integer_in_the_eval_task_registry_is_refused(tmp_path, capsys):
    tasks = json.loads((REPO_ROOT / "eval/tasks.json").read_text())
    name = next(iter(tasks["tasks"]))
    tasks["tasks"][name]["max_new_tokens"] = 100.0
    path = tmp_path / "tasks.json"
    path.write_text(json.dumps(tasks, indent=2))
    assert evaluate(["--list", "--task-registry", str(path)]) == 2
    assert f"tasks.{name}.max_new_tokens: 100.0 is not of type 'integer'" in capsys.readouterr().err

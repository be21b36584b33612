"""The registry: shipped recipes, FinLoRA compatibility, extends, overrides, and the error corpus."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lora.core.errors import RecipeError
from lora.prompts.mixtures import dataset_specs
from lora.recipes.registry import list_recipes, read_registry, resolve_recipe, runnable_names

FINLORA_RECIPE = {
    "sentiment_llama_3_1_8b_8bits_r8_dora": {
        "base_model": "meta-llama/Llama-3.1-8B-Instruct",
        "dataset_path": "../data/train/finlora_sentiment_train.jsonl",
        "lora_r": 8,
        "quant_bits": 8,
        "peft_use_dora": True,
        "learning_rate": 0.0001,
        "num_epochs": 4,
        "batch_size": 8,
        "gradient_accumulation_steps": 2,
    }
}


def write_registry(directory, recipes) -> str:
    path = directory / "finetune_configs.json"
    path.write_text(json.dumps(recipes, indent=2))
    return str(path)


def run_cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "lora/finetune.py" if cwd is None else str(REPO / "lora" / "finetune.py"), *args],
        cwd=cwd or REPO, capture_output=True, text=True, timeout=120,
    )


from conftest import REPO_ROOT as REPO  # noqa: E402


@pytest.mark.parametrize("name", runnable_names(read_registry()[1]))
def test_every_shipped_recipe_validates(name):
    recipe = resolve_recipe(name)
    assert recipe["lora_r"] > 0 and recipe["lora_alpha"] > 0
    assert all(spec.path.startswith(str(REPO)) for spec in dataset_specs(recipe))


def test_shipped_recipe_datasets_exist():
    for name in runnable_names(read_registry()[1]):
        recipe = resolve_recipe(name)
        assert all((REPO / spec.path).is_file() for spec in dataset_specs(recipe)), name


def test_finlora_recipe_validates_verbatim_in_finlora_layout(tmp_path):
    # FinLoRA keeps its registry in lora/ and data in ../data/: relative paths resolve against the registry file.
    (tmp_path / "lora").mkdir()
    (tmp_path / "data" / "train").mkdir(parents=True)
    data_file = tmp_path / "data" / "train" / "finlora_sentiment_train.jsonl"
    data_file.write_text('{"context": "x Answer: ", "target": "positive"}\n')
    registry = write_registry(tmp_path / "lora", FINLORA_RECIPE)
    recipe = resolve_recipe("sentiment_llama_3_1_8b_8bits_r8_dora", registry)
    assert recipe["use_dora"] is True and recipe["quant_bits"] == 8 and recipe["lora_r"] == 8
    assert recipe["dataset_path"] == str(data_file)
    assert recipe["lora_alpha"] == 16 and recipe["num_epochs"] == 4 and recipe["gradient_accumulation_steps"] == 2


def test_finlora_recipe_dry_runs_from_another_folder(tmp_path):
    (tmp_path / "lora").mkdir()
    registry = write_registry(tmp_path / "lora", FINLORA_RECIPE)
    result = run_cli("sentiment_llama_3_1_8b_8bits_r8_dora", "--registry", registry, "--dry-run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    assert printed["base_model"] == "meta-llama/Llama-3.1-8B-Instruct" and printed["use_dora"] is True
    assert printed["dataset_path"] == str((tmp_path / "data/train/finlora_sentiment_train.jsonl").resolve())
    assert "does not exist" in result.stderr and "a real run would stop here" in result.stderr  # loads nothing


def test_extends_chain_and_override_precedence(tmp_path):
    registry = write_registry(tmp_path, {
        "_base": {"base_model": "m", "lora_r": 4, "learning_rate": 0.001, "quant_bits": 4,
                  "bnb_4bit_compute_dtype": "float32"},
        "child": {"extends": "_base", "dataset_path": "d.jsonl", "lora_r": 16},
        "grandchild": {"extends": "child", "quant_bits": 8, "peft_use_rslora": True},
    })
    child = resolve_recipe("child", registry)
    assert (child["lora_r"], child["learning_rate"], child["bnb_4bit_compute_dtype"]) == (16, 0.001, "float32")
    grandchild = resolve_recipe("grandchild", registry, ["lora_r=32", "use_dora=true", "description=hello world"])
    assert grandchild["quant_bits"] == 8 and grandchild["use_rslora"] is True
    assert grandchild["lora_r"] == 32 and grandchild["use_dora"] is True
    assert grandchild["description"] == "hello world"
    assert grandchild.to_record()["overrides"] == {"lora_r": 32, "use_dora": True, "description": "hello world"}


def test_quant_bits_none_16_and_32_mean_unquantised(tmp_path):
    registry = write_registry(tmp_path, {"r": {"base_model": "m", "dataset_path": "d"}})
    assert resolve_recipe("r", registry, ["quant_bits=none"])["quant_bits"] is None
    sixteen = resolve_recipe("r", registry, ["quant_bits=16"])
    assert sixteen["quant_bits"] is None and sixteen["dtype"] == "bfloat16"
    assert resolve_recipe("r", registry, ["quant_bits=null"])["dtype"] == "float32"


def test_shared_bases_are_not_listed_or_runnable(tmp_path):
    registry = write_registry(tmp_path, {"_base": {"base_model": "m"}, "r": {"extends": "_base", "dataset_path": "d"}})
    assert [row["name"] for row in list_recipes(registry)] == ["r"]
    with pytest.raises(RecipeError, match='no recipe named "_base"'):
        resolve_recipe("_base", registry)


def test_the_list_has_a_row_per_recipe_with_what_it_trains_and_broken_recipes_say_their_problem(tmp_path):
    from lora.recipes.registry import format_recipe_table

    outside = tmp_path.parent / "elsewhere.jsonl"
    registry = write_registry(tmp_path, {
        "_base": {"base_model": "org/model"},
        "dora4": {"extends": "_base", "dataset_path": "data/a.jsonl", "quant_bits": 4, "use_dora": True, "lora_r": 16},
        "broken": {"extends": "_base", "dataset_path": "d", "lora_alpha": 0, "lora_r": "eight"},
        "lora_bf16": {"extends": "_base", "dataset_path": str(outside), "quant_bits": None, "dtype": "bfloat16"},
        "mix": {"extends": "_base", "datasets": [{"path": "a.jsonl", "weight": 2}, {"path": "b.jsonl"}]},
    })
    problem = str(pytest.raises(RecipeError, resolve_recipe, "broken", registry).value).splitlines()[-1].strip()
    rows = list_recipes(registry)
    assert rows == [  # every recipe after a broken one is still listed
        {"name": "dora4", "model": "org/model", "quant": "4-bit", "adapter": "DoRA", "rank": 16,
         "dataset": "data/a.jsonl"},
        {"name": "broken", "problem": problem},
        {"name": "lora_bf16", "model": "org/model", "quant": "bfloat16", "adapter": "LoRA", "rank": 8,
         "dataset": str(outside)},  # outside the registry's folder: shown whole
        {"name": "mix", "model": "org/model", "quant": "4-bit", "adapter": "LoRA", "rank": 8,
         "dataset": "2 datasets (mixture)"},
    ]
    assert '"lora_r"' in problem and "eight" in problem  # the last of its two problems
    working = [row for row in rows if "problem" not in row]
    table = format_recipe_table(working).splitlines()
    header = ["name", "model", "quant", "adapter", "rank", "dataset"]
    starts = [table[0].index(column) for column in header]  # each column starts where its heading does
    assert table[0].split() == header and table[1].split("  ") == ["-" * (b - a - 2) for a, b in zip(
        starts, starts[1:])] + ["-" * max(len(row["dataset"]) for row in working)]
    for line, row in zip(table[2:], working, strict=True):
        assert [line[start:].split("  ")[0] for start in starts] == [str(row[column]) for column in header]
    assert all(line == line.rstrip() for line in table)  # no line ends in padding
    broken = format_recipe_table(rows).splitlines()[3]
    assert broken.split(None, 1) == ["broken", problem]  # a broken recipe's problem fills the model column


def test_a_recipe_as_written_is_its_merged_fields_with_our_names_and_paths_as_given(tmp_path):
    from lora.recipes.registry import recipe_as_written

    recipes = {"_base": {"base_model": "org/model", "description": "shared", "lora_r": 4},
               "r": {"extends": "_base", "dataset_path": "../data/x.jsonl", "peft_use_dora": True, "lora_r": 8,
                     "description": "mine"}}
    here, there = tmp_path / "here", tmp_path / "there"
    here.mkdir(), there.mkdir()
    written = {"base_model": "org/model", "lora_r": 8, "dataset_path": "../data/x.jsonl", "use_dora": True}
    assert recipe_as_written(write_registry(here, recipes), "r") == written
    assert recipe_as_written(write_registry(there, recipes), "r") == written  # the same wherever the file lies


# (recipe fields, expected fragments of the error message): every problem is reported, with a suggestion.
BAD_RECIPES = [
    ({"lora_rank": 8}, ['unknown field "lora_rank" (did you mean "lora_r"?)']),
    ({"peft_use_dorra": True}, ['unknown field "peft_use_dorra" (did you mean "peft_use_dora"?)']),
    ({"lora_r": 0}, ['field "lora_r"', "nearest valid value: 1"]),
    ({"lora_alpha": 0}, ['field "lora_alpha"', "expected a value > 0"]),
    ({"lora_r": "8"}, ['field "lora_r": \'8\' is not of type \'integer\'', "LoRA rank"]),
    ({"quant_bits": 6}, ['field "quant_bits"', "nearest: 4"]),
    ({"bnb_4bit_quant_type": "nf5"}, ['nearest: "nf4"']),
    ({"quant_bits": 8, "bnb_4bit_compute_dtype": "float32"}, ['"bnb_4bit_compute_dtype" is a 4-bit option']),
    ({"quant_bits": 4, "llm_int8_threshold": 5.0}, ['"llm_int8_threshold" is an 8-bit option']),
    ({"validation_path": "v.jsonl", "validation_split": 0.1}, ["either", "not both"]),
    ({"eval_steps": 10}, ['"eval_steps" needs a validation set']),
    ({"use_dora": True, "peft_use_dora": True}, ["FinLoRA's name for \"use_dora\""]),
    ({"extends": "nope"}, ['no recipe named "nope"']),
    ({"lora_target_modules": "all"}, ['field "lora_target_modules"']),
    ({"lr_scheduler_type": "cosin"}, ['nearest: "cosine"']),
    ({"eval_tasks": ["sentimnt"]}, ['unknown task "sentimnt" (did you mean "sentiment"?)']),
]


@pytest.mark.parametrize(("fields", "fragments"), BAD_RECIPES)
def test_bad_recipe_messages(tmp_path, fields, fragments):
    registry = write_registry(tmp_path, {"bad": {"base_model": "m", "dataset_path": "d.jsonl", **fields}})
    with pytest.raises(RecipeError) as caught:
        resolve_recipe("bad", registry)
    message = str(caught.value)
    assert 'recipe "bad"' in message
    for fragment in fragments:
        assert fragment in message


def _problems(registry: str, name: str, overrides=None) -> list[str]:
    """The problem lines of the RecipeError that resolving `name` raises, without their "  - " bullets."""
    with pytest.raises(RecipeError) as caught:
        resolve_recipe(name, registry, overrides)
    return [line.removeprefix("  - ") for line in str(caught.value).splitlines()[1:]]


LORA_R = "expected: LoRA rank r (> 0)."
SEED = ("expected: Seed for data order, adapter init and dropout: 0 to 2^32-1 (what numpy's and transformers' seeding "
        "accept).")
TRACKERS = ('"azure_ml", "clearml", "codecarbon", "comet_ml", "dagshub", "dvclive", "flyte", "kubeflow", "mlflow", '
            '"neptune", "swanlab", "tensorboard", "trackio", "wandb"')
WHOLE = "is not of type 'integer' (a whole number without a decimal point or exponent; nearest valid value:"


@pytest.mark.parametrize(("field", "value", "problems"), [
    ("lora_r", 7.6, [f"field \"lora_r\": 7.6 {WHOLE} 8) — {LORA_R}"]),
    ("lora_r", 0.2, [f"field \"lora_r\": 0.2 {WHOLE} 1) — {LORA_R}",
                     'field "lora_r": 0.2 is less than the minimum of 1 (nearest valid value: 1)']),
    ("seed", -0.7, [f"field \"seed\": -0.7 {WHOLE} 0) — {SEED}",
                    'field "seed": -0.7 is less than the minimum of 0 (nearest valid value: 0)']),
    ("seed", 4294967299.7, [f"field \"seed\": 4294967299.7 {WHOLE} 4294967295) — {SEED}",
                            'field "seed": 4294967299.7 is greater than the maximum of 4294967295 (nearest valid '
                            'value: 4294967295)']),
    ("lora_r", "NaN", ["field \"lora_r\": 'NaN' is not of type 'integer' (NaN and Infinity are not numbers a recipe "
                       f"accepts; give a finite number, e.g. the default 8) — {LORA_R}"]),
    ("learning_rate", "-Infinity", ["field \"learning_rate\": '-Infinity' is not of type 'number' (NaN and Infinity "
                                    "are not numbers a recipe accepts; give a finite number, e.g. the default 0.0001) "
                                    "— expected: Peak learning rate (> 0)."]),
    ("lora_r", "eight", [f"field \"lora_r\": 'eight' is not of type 'integer' — {LORA_R}"]),  # no number hint
    ("lora_r", "8", [f"field \"lora_r\": '8' is not of type 'integer' — {LORA_R}"]),
    ("base_model", float("1e300"), ["field \"base_model\": 1e+300 is not of type 'string' — expected: "]),
    ("quant_bits", 7, ['field "quant_bits": 7 is not allowed (allowed: 4, 8, 16, 32, "none", null; nearest: 8)']),
    ("quant_bits", 31, ['field "quant_bits": 31 is not allowed (allowed: 4, 8, 16, 32, "none", null; nearest: 32)']),
    ("quant_bits", "4bit", ['field "quant_bits": "4bit" is not allowed (allowed: 4, 8, 16, 32, "none", null)']),
    ("quant_bits", "nne", ['field "quant_bits": "nne" is not allowed (allowed: 4, 8, 16, 32, "none", null; '
                           'nearest: "none")']),
    ("warmup_ratio", 1.5, ['field "warmup_ratio": 1.5 is greater than the maximum of 1 (nearest valid value: 1)']),
    # a value of one branch's shape is described by that branch: the misspelt name, the bad item of a list
    ("report_to", "wandbb", [f'field "report_to": "wandbb" is not allowed (allowed: "none", "all", {TRACKERS}; '
                             'nearest: "wandb")']),
    ("report_to", ["mlflow", "tensorbord"], [f'field "report_to.1": "tensorbord" is not allowed (allowed: {TRACKERS}; '
                                             'nearest: "tensorboard")']),
    ("lora_target_modules", ["q_proj", 1], ["field \"lora_target_modules.1\": 1 is not of type 'string' — expected: "
                                            "'all-linear' (every linear layer of the architecture except the output "
                                            'head, detected from the model) or a list of module name suffixes such as '
                                            '["q_proj", "v_proj"].']),
    ("lora_target_modules", "all", ["field \"lora_target_modules\": 'all-linear' was expected"]),
    ("datasets", [{"path": "a.jsonl", "weight": -1}], ['field "datasets.0.weight": -1 is less than or equal to the '
                                                       "minimum of 0 (expected a value > 0)"]),
    ("lora_rnk", 4, ['unknown field "lora_rnk" (did you mean "lora_r"?); unknown field "zzz_qqq"']),
    # of no branch's type: the field's own description says what it takes
    ("report_to", 5, ['field "report_to": 5 is not valid under any of the given schemas — expected: Experiment '
                      "trackers the Trainer reports to, as its report_to: 'none', one integration name (tensorboard, "
                      "mlflow, trackio, wandb, ...), a list of them, or 'all' (every one installed). Logs go to logs/ "
                      "inside the run's output folder unless the tracker's own environment variables name another "
                      "place (README: Experiment tracking)."]),
    # a field of several types gets the same number hint; a non-number field gets none, whatever its text
    ("max_train_examples", 7.6, ["field \"max_train_examples\": 7.6 is not of type 'integer', 'null' (a whole number "
                                 "without a decimal point or exponent; nearest valid value: 8) — expected: Use only "
                                 "the first N training rows (after shuffling with the seed). null = all."]),
    ("use_dora", "Infinity", ["field \"use_dora\": 'Infinity' is not of type 'boolean' — expected: Weight-decomposed "
                              "LoRA (DoRA): learn a magnitude vector per output row besides the low-rank direction "
                              "update."]),
])
def test_a_wrong_value_says_why_and_the_nearest_valid_value(tmp_path, field, value, problems):
    recipe = {"base_model": "m", "dataset_path": "d", field: value}
    if field == "datasets":
        del recipe["dataset_path"]
    if field == "lora_rnk":  # two unknown fields: one line naming both
        recipe["zzz_qqq"] = 1
    found = _problems(write_registry(tmp_path, {"r": recipe}), "r")
    if field == "base_model":  # its description is long: the start is what is checked
        assert len(found) == 1 and found[0].startswith(problems[0])
    else:
        assert found == problems


@pytest.mark.parametrize(("fields", "problems"), [
    ({"validation_path": "v.jsonl", "validation_split": 0.1},
     ['give either "validation_path" or "validation_split", not both']),
    ({"eval_steps": 10}, ['field "eval_steps" needs a validation set (validation_path or validation_split)']),
    ({"eval_steps": 10, "validation_split": 0.1}, []),
    ({"eval_steps": 10, "validation_path": "v.jsonl"}, []),
    ({"fast_dora": True}, ['field "fast_dora" only applies to DoRA recipes (set use_dora true, or drop fast_dora)']),
    ({"fast_dora": True, "peft_use_dora": False},  # named as the user spelt it
     ['field "fast_dora" only applies to DoRA recipes (set peft_use_dora true, or drop fast_dora)']),
    ({"fast_dora": True, "use_dora": True}, []),
    ({"max_steps": 0}, ['field "max_steps": 0 would train nothing (use -1 for num_epochs, or a positive count)']),
    ({"max_steps": 1}, []),
    ({"early_stopping_patience": 2, "eval_steps": 5, "validation_split": 0.1,
      "early_stopping_metric": "sentimnt:accuracy"},
     ['field "early_stopping_metric": unknown task "sentimnt" (did you mean "sentiment"?) (tasks are defined in '
      "eval/tasks.json)"]),
    ({"lora_dropout": 1},
     ['field "lora_dropout": 1 is greater than or equal to the maximum of 1 (expected a value < 1)']),
    ({"base_model": ""}, ["field \"base_model\": '' should be non-empty — expected: Hub id (e.g. "
                          "HuggingFaceTB/SmolLM2-135M-Instruct) or a local model folder (relative paths resolve "
                          "against the registry file's folder). Offline, known ids come from a local source."]),
])
def test_rules_across_fields_each_say_what_to_change(tmp_path, fields, problems):
    registry = write_registry(tmp_path, {"r": {"base_model": "m", "dataset_path": "d", **fields}})
    if problems:
        assert _problems(registry, "r") == problems
    else:
        resolve_recipe("r", registry)


def test_quant_bits_32_is_unquantised_and_16_keeps_a_dtype_that_was_given(tmp_path):
    registry = write_registry(tmp_path, {"r": {"base_model": "m", "dataset_path": "d"}})
    thirty_two = resolve_recipe("r", registry, ["quant_bits=32"])
    assert thirty_two["quant_bits"] is None and thirty_two["dtype"] == "float32" and not thirty_two.quantised
    assert resolve_recipe("r", registry, ["quant_bits=16", "dtype=float16"])["dtype"] == "float16"


def test_the_run_record_says_which_recipe_of_which_registry_with_what_overrides(tmp_path):
    registry = write_registry(tmp_path, {"r": {"base_model": "m", "dataset_path": "d"}})
    recipe = resolve_recipe("r", registry, ["lora_r=4"])
    record = recipe.to_record()
    assert (record["name"], record["registry"], record["overrides"]) == ("r", registry, {"lora_r": 4})
    assert record["auto_dtypes"] == recipe.auto_dtypes and record["lora_r"] == 4
    assert recipe.get("lora_r") == 4 and recipe.get("no_such_field") is None and recipe.get("no_such_field", 5) == 5
    automatic = resolve_recipe("r", registry, ["bnb_4bit_compute_dtype=auto"]).auto_dtypes
    assert automatic["bnb_4bit_compute_dtype"]["from"] == "auto"  # what "auto" became on this machine, and why


def test_a_task_added_to_the_evaluation_registry_is_known_to_the_next_recipe_resolved(tmp_path, monkeypatch):
    """The task names are cached per version of eval/tasks.json (its modification time and size): a long-lived
    process (a sweep's worker) sees an edited file, whichever of the two changed."""
    import os

    import lora.recipes.registry as registry_module

    tasks = tmp_path / "eval" / "tasks.json"
    tasks.parent.mkdir()
    monkeypatch.setattr(registry_module, "REPO_ROOT", tmp_path)  # a checkout whose eval/tasks.json is this one
    monkeypatch.setattr(registry_module, "EVAL_TASKS_PATH", tasks)
    registry = write_registry(tmp_path, {"r": {"base_model": "m", "dataset_path": "d", "eval_tasks": ["bbbb"]}})

    def problems_after_writing(name: str, mtime_ns: int) -> list[str]:
        tasks.write_text(json.dumps({"tasks": {name: {}}}))
        os.utime(tasks, ns=(mtime_ns, mtime_ns))
        try:
            resolve_recipe("r", registry)
        except RecipeError as error:
            return str(error).splitlines()[1:]
        return []

    unknown = [f'  - field "eval_tasks": unknown task "bbbb" (tasks are defined in {Path("eval/tasks.json")})']
    assert problems_after_writing("aaaa", 10**18) == unknown
    assert problems_after_writing("bbbb", 2 * 10**18) == []  # the same size, a new time
    assert problems_after_writing("cccccc", 2 * 10**18) == unknown  # the same time, a new size
    tasks.unlink()
    resolve_recipe("r", registry)  # no task registry: no task check (the evaluation reports its absence itself)


def test_a_missing_required_field_is_named_with_what_it_is_for(tmp_path):
    assert _problems(write_registry(tmp_path, {"r": {"dataset_path": "d"}}), "r") == [
        'field "base_model" is required — Hub id (e.g. HuggingFaceTB/SmolLM2-135M-Instruct) or a local model folder '
        "(relative paths resolve against the registry file's folder). Offline, known ids come from a local source."]
    assert _problems(write_registry(tmp_path, {"r": {"base_model": "m"}}), "r") == [
        'field "dataset_path" is required — a JSONL file of training rows (or "datasets": a list of {"path", '
        '"weight"} files to mix)']


def test_every_recipe_field_says_what_it_is_for():
    # the messages quote a field's description as what was expected: a field without one would say nothing
    schema = json.loads((REPO / "lora" / "recipes" / "recipe_schema.json").read_text())
    assert all(spec.get("description", "").strip() for spec in schema["properties"].values())


def test_a_broken_extends_chain_still_reports_every_other_problem_as_an_unbroken_one_would(tmp_path):
    """Each layer of r -> mid -> _base carries its own problems (an unknown field, a bad value, a FinLoRA alias given
    twice) and quant_bits 8 in mid makes _base's 4-bit option moot but r's a conflict; cutting the chain at _base's
    parent must add its own problem and lose none of these, nor invent one."""
    chain = {
        "_base": {"base_model": "m", "lora_rnk": 4, "bnb_4bit_compute_dtype": "bfloat16", "use_dora": True,
                  "peft_use_dora": True},
        "mid": {"extends": "_base", "quant_bits": 8, "lora_alpha": 0},
        "r": {"extends": "mid", "dataset_path": "d", "lora_r": "8", "bnb_4bit_quant_type": "nf4"},
    }
    whole = _problems(write_registry(tmp_path, chain), "r")
    assert sorted(whole) == sorted([
        'unknown field "lora_rnk" (did you mean "lora_r"?)',
        'field "peft_use_dora" is FinLoRA\'s name for "use_dora": give only one of them',
        'field "lora_alpha": 0 is less than or equal to the minimum of 0 (expected a value > 0)',
        "field \"lora_r\": '8' is not of type 'integer' — expected: LoRA rank r (> 0).",
        'field "bnb_4bit_quant_type" is a 4-bit option but quant_bits is 8 (set quant_bits 4)',
    ]), whole
    for missing_parent in ("nowhere", "_base"):  # a parent that does not exist, and a cycle back to the chain's end
        broken = {**chain, "_base": {**chain["_base"], "extends": missing_parent if missing_parent != "_base" else "r"}}
        folder = tmp_path / missing_parent
        folder.mkdir()
        found = _problems(write_registry(folder, broken), "r")
        extends = [line for line in found if line.startswith('field "extends"') or '"extends" forms a cycle' in line]
        assert len(extends) == 1 and sorted(set(found) - set(extends)) == sorted(whole), found
    unquantised_default = {"_base": {"base_model": "m", "extends": "nowhere", "llm_int8_threshold": 5.0},
                           "r": {"extends": "_base", "dataset_path": "d"}}  # quant_bits from the default (4)
    (tmp_path / "default").mkdir()
    assert any('"llm_int8_threshold" is an 8-bit option' in line
               for line in _problems(write_registry(tmp_path / "default", unquantised_default), "r"))


def test_an_override_value_may_hold_an_equals_sign():
    from lora.recipes.registry import parse_override

    assert parse_override("dataset_path=data/a=b.jsonl") == ("dataset_path", "data/a=b.jsonl")
    assert parse_override(" lora_r = 16") == ("lora_r", 16)


def test_all_problems_reported_at_once(tmp_path):
    registry = write_registry(tmp_path, {"bad": {"base_model": "m", "lora_rank": 8, "lora_r": -1, "seed": -3}})
    with pytest.raises(RecipeError) as caught:
        resolve_recipe("bad", registry)
    message = str(caught.value)
    assert "4 problem(s)" in message
    for fragment in ['"dataset_path" is required', '"lora_rank"', 'field "lora_r"', 'field "seed"']:
        assert fragment in message


def test_every_unknown_field_is_reported_with_its_suggestion(tmp_path):
    # unknown fields in a shared base, in the recipe itself and in an override: each one named, none dropped
    registry = write_registry(tmp_path, {
        "_base": {"base_model": "m", "lora_rnk": 4},
        "bad": {"extends": "_base", "dataset_path": "d.jsonl", "lora_alfa": 8, "learning_rat": 0.1, "zzz_qqq": 1},
    })
    with pytest.raises(RecipeError) as caught:
        resolve_recipe("bad", registry, ["num_epoch=2"])
    message = str(caught.value)
    for key, suggestion in [("lora_rnk", "lora_r"), ("lora_alfa", "lora_alpha"), ("learning_rat", "learning_rate"),
                            ("num_epoch", "num_epochs")]:
        assert f'unknown field "{key}" (did you mean "{suggestion}"?)' in message, message
    assert 'unknown field "zzz_qqq"' in message
    assert message.count("unknown field") == 5


def test_extends_cycle_is_reported(tmp_path):
    registry = write_registry(tmp_path, {"a": {"extends": "b"}, "b": {"extends": "a"}})
    with pytest.raises(RecipeError, match="cycle: a -> b -> a"):
        resolve_recipe("a", registry)


def test_bad_override_is_revalidated(tmp_path):
    registry = write_registry(tmp_path, {"r": {"base_model": "m", "dataset_path": "d"}})
    with pytest.raises(RecipeError, match='field "batch_size"'):
        resolve_recipe("r", registry, ["batch_size=0"])
    with pytest.raises(RecipeError, match="expected key=value"):
        resolve_recipe("r", registry, ["batch_size"])


def test_cli_unknown_recipe_exits_2_with_suggestion_and_no_traceback():
    result = run_cli("sentiment_smollm2_135m_4bits_r8_dorra", "--dry-run")
    assert result.returncode == 2
    assert 'did you mean "sentiment_smollm2_135m_4bits_r8_dora"' in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_invalid_json_registry_names_line(tmp_path):
    bad = tmp_path / "finetune_configs.json"
    bad.write_text('{\n  "r": {"base_model": "m",}\n}\n')
    result = run_cli("r", "--registry", str(bad))
    assert result.returncode == 2 and f"{bad}:2:" in result.stderr and "Traceback" not in result.stderr


def test_cli_list_shows_the_table():
    result = run_cli("--list")
    assert result.returncode == 0
    header, _, *rows = result.stdout.splitlines()
    assert header.split() == ["name", "model", "quant", "adapter", "rank", "dataset"]
    assert any(row.startswith("sentiment_smollm2_135m_4bits_r8_dora") and "DoRA" in row for row in rows)


def test_cli_dry_run_applies_overrides():
    result = run_cli("sentiment_smollm2_135m_4bits_r8_dora", "--dry-run", "--set", "lora_r=16", "--set",
                     "peft_use_dora=false")
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    assert printed["lora_r"] == 16 and printed["use_dora"] is False


# FinLoRA's aliases: a message names the field as the user wrote it, wherever it was written.
ALIAS_SPELLING_CASES = [
    ({"peft_use_dora": "yes"}, [], 'field "peft_use_dora": \'yes\' is not of type \'boolean\''),
    ({"peft_use_rslora": 1}, [], 'field "peft_use_rslora": 1 is not of type \'boolean\''),
    ({}, ["peft_use_dora=maybe"], 'field "peft_use_dora": \'maybe\' is not of type \'boolean\''),
    ({"peft_use_dora": False, "fast_dora": True}, [], "(set peft_use_dora true, or drop fast_dora)"),
]


@pytest.mark.parametrize(("fields", "overrides", "fragment"), ALIAS_SPELLING_CASES)
def test_alias_errors_name_the_field_as_written(tmp_path, fields, overrides, fragment):
    registry = write_registry(tmp_path, {"r": {"base_model": "m", "dataset_path": "d.jsonl", **fields}})
    with pytest.raises(RecipeError) as caught:
        resolve_recipe("r", registry, overrides)
    assert fragment in str(caught.value)
    assert '"use_dora"' not in str(caught.value) and '"use_rslora"' not in str(caught.value)


def test_our_own_spelling_in_a_later_layer_takes_the_name_back(tmp_path):
    registry = write_registry(tmp_path, {"base": {"base_model": "m", "dataset_path": "d.jsonl", "peft_use_dora": True},
                                         "r": {"extends": "base", "use_dora": "no"}})
    with pytest.raises(RecipeError, match="field \"use_dora\": 'no' is not of type 'boolean'"):
        resolve_recipe("r", registry)
    recipe = resolve_recipe("base", registry)
    assert recipe["use_dora"] is True and recipe.field_name("use_dora") == "peft_use_dora"
    assert recipe.field_name("lora_r") == "lora_r"


def test_cli_alias_error_names_the_alias():
    result = run_cli("sentiment_llama_3_1_8b_4bits_r4_dora", "--dry-run", "--set", "peft_use_dora=3")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert 'field "peft_use_dora": 3 is not of type' in result.stderr

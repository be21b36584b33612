"""Sweeps on a tiny local Llama: a grid of 4 real trials, TPE with a median pruner that stops losing trials early,
the best trial as a registry entry, and sweep files that are wrong in each way a user can get them wrong (exit 2,
naming the field). Workers on PostgreSQL and a killed worker: tests/test_sweep_workers.py."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import optuna
import pytest

from conftest import REPO_ROOT
from lora.recipes.registry import resolve_recipe
from lora.sweep import main


@pytest.fixture(scope="module")
def sweep_home(tmp_path_factory, tiny_model_dir):
    """A registry with one tiny recipe on 80 sentiment rows, and a sweeps file beside it."""
    folder = tmp_path_factory.mktemp("sweep-home")
    rows = (REPO_ROOT / "data/train/sentiment_train.jsonl").read_text().splitlines()[:80]
    (folder / "train.jsonl").write_text("\n".join(rows) + "\n")
    (folder / "finetune_configs.json").write_text(json.dumps({"tiny": {
        "base_model": str(tiny_model_dir), "dataset_path": "train.jsonl", "quant_bits": None,
        "max_steps": 4, "batch_size": 4, "learning_rate": 0.01, "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0,
        "logging_steps": 1, "warmup_steps": 0, "lr_scheduler_type": "constant", "max_seq_length": 96,
        "eval_tasks": ["sentiment"],
    }}, indent=2))
    return folder


def write_sweeps(folder, sweeps: dict):
    path = folder / "sweeps.json"
    path.write_text(json.dumps(sweeps, indent=2))
    return path


GRID = {
    "recipe": "tiny",
    "space": {"lora_r": {"type": "categorical", "choices": [2, 4]},
              "learning_rate": {"type": "float", "low": 0.001, "high": 0.01, "log": True, "grid": [0.001, 0.01]}},
    "objective": {"task": "sentiment", "metric": "accuracy", "direction": "maximize", "validation": {"split": 0.25},
                  "report_every_steps": 2},
    "sampler": {"type": "grid"},
}


def load_study(out, name):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{out / 'study.sqlite3'}")


@pytest.mark.slow
def test_grid_of_four_trials_each_an_ordinary_run_with_results_and_best(sweep_home, tmp_path, capsys):
    sweeps = write_sweeps(sweep_home, {"grid4": GRID})
    out = tmp_path / "grid4"
    assert main(["grid4", "--sweeps", str(sweeps), "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("[sweep] trial ") == 4  # a progress line per trial

    study = load_study(out, "grid4")
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 4
    assert sorted((t.params["lora_r"], t.params["learning_rate"]) for t in study.trials) == [
        (2, 0.001), (2, 0.01), (4, 0.001), (4, 0.01)]
    for trial in study.trials:
        folder = out / f"trial-{trial.number:03d}"
        summary = json.loads((folder / "run_summary.json").read_text())
        assert summary["status"] == "completed" and summary["steps"] == 4
        record = summary["sweep"]
        assert record["state"] == "complete" and record["trial"] == trial.number and record["params"] == trial.params
        assert [r["step"] for r in record["reports"]] == [2, 4]  # every 2 steps, the last one included
        assert record["reports"][-1]["value"] == trial.value
        recipe = json.loads((folder / "recipe.json").read_text())
        assert (recipe["lora_r"], recipe["learning_rate"]) == (trial.params["lora_r"], trial.params["learning_rate"])
        assert recipe["validation_split"] == 0.25 and (folder / "adapter_model.safetensors").is_file()
        # The recorded command reproduces the trial's recipe through lora/finetune.py.
        command = record["reproduce"].split()[1:] + ["--dry-run"]
        dry = subprocess.run([sys.executable, *command], capture_output=True, text=True, cwd=REPO_ROOT, check=True)
        reproduced = json.loads(dry.stdout)
        assert {k: v for k, v in reproduced.items() if k != "overrides"} == {
            k: v for k, v in recipe.items() if k != "overrides"}

    with (out / "results.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert list(table[0]) == ["trial", "lora_r", "learning_rate", "objective", "steps", "wall_seconds", "state"]
    values = [float(row["objective"]) for row in table]
    assert values == sorted(values, reverse=True) and len(table) == 4
    assert "| trial | lora_r | learning_rate | sentiment.accuracy |" in (out / "results.md").read_text()
    for plot in ("optimization_history.png", "param_importances.png", "objective_vs_parameters.png"):
        assert (out / plot).read_bytes()[:4] == b"\x89PNG"

    # Rerunning continues the finished study: no trial runs again.
    assert main(["grid4", "--sweeps", str(sweeps), "--output-dir", str(out)]) == 0
    assert "[sweep] trial " not in capsys.readouterr().out and len(load_study(out, "grid4").trials) == 4

    # --best prints a registry entry; pasted into the registry it resolves to the best trial's recipe.
    assert main(["grid4", "--sweeps", str(sweeps), "--output-dir", str(out), "--best"]) == 0
    entry = json.loads("{" + capsys.readouterr().out + "}")
    best = max(study.trials, key=lambda t: t.value)
    registry = json.loads((sweep_home / "finetune_configs.json").read_text())
    pasted = tmp_path / "finetune_configs.json"
    pasted.write_text(json.dumps({**registry, **entry}))
    recipe = resolve_recipe("grid4_best", pasted)
    assert (recipe["lora_r"], recipe["learning_rate"]) == (best.params["lora_r"], best.params["learning_rate"])
    assert recipe["validation_split"] == 0.25


@pytest.mark.slow
def test_tpe_with_median_pruner_stops_losing_trials_early(sweep_home, tmp_path, capsys):
    sweeps = write_sweeps(sweep_home, {"tpe_pruned": {
        "recipe": "tiny",
        "set": {"max_steps": 6},
        "space": {"learning_rate": {"type": "float", "low": 1e-6, "high": 0.05, "log": True},
                  "use_dora": {"type": "categorical", "choices": [False, True]}},
        "objective": {"metric": "validation_loss", "direction": "minimize", "validation": {"split": 0.25},
                      "report_every_steps": 1},
        "trials": 8,
        "sampler": {"type": "tpe", "seed": 3, "n_startup_trials": 3},
        "pruner": {"type": "median", "n_startup_trials": 2},
    }})
    out = tmp_path / "tpe"
    assert main(["tpe_pruned", "--sweeps", str(sweeps), "--output-dir", str(out)]) == 0
    study = load_study(out, "tpe_pruned")
    states = [t.state.name for t in study.trials]
    assert len(states) == 8 and set(states) <= {"COMPLETE", "PRUNED"}
    pruned = [t for t in study.trials if t.state.name == "PRUNED"]
    assert pruned, states
    for trial in pruned:
        summary = json.loads((out / f"trial-{trial.number:03d}" / "run_summary.json").read_text())
        assert summary["sweep"]["state"] == "pruned"
        assert summary["steps"] == summary["sweep"]["pruned_at_step"] == trial.last_step < 6
        assert trial.user_attrs["steps"] == summary["steps"]
    for trial in study.trials:
        if trial.state.name == "COMPLETE":
            assert trial.user_attrs["steps"] == 6 and sorted(trial.intermediate_values) == [1, 2, 3, 4, 5, 6]
    assert "PRUNED at step" in capsys.readouterr().out
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert {row["state"] for row in rows} == {"complete", "pruned"}


BAD_SWEEPS = [
    ({"space": {"lora_rank": {"type": "categorical", "choices": [4, 8]}}},
     'field "space.lora_rank": no recipe field "lora_rank" (did you mean "lora_r"?)'),
    ({"space": {"lora_r": {"type": "categorical", "choice": [4, 8]}}},
     'unknown field "space.lora_r.choice" (did you mean "choices"?)'),
    ({"space": {"learning_rate": {"type": "float", "low": 0.001, "high": 0.01, "log": True}}},
     'field "space.learning_rate": the grid sampler needs the points of a float parameter: add "grid"'),
    ({"space": {"learning_rate": {"type": "float", "low": 0, "high": 0.01, "log": True, "grid": [0.01]}}},
     'field "space.learning_rate.low": 0 on a log scale must be > 0'),
    ({"space": {"lora_r": {"type": "categorical", "choices": [4, "big"]}}},
     'field "space.lora_r": the value "big" makes the recipe invalid'),
    ({"sampler": {"type": "random"}}, 'field "sampler.type": "random" is not allowed (allowed: "grid", "tpe")'),
    ({"sampler": {"type": "tpe"}}, 'field "trials" is required with the tpe sampler'),
    ({"pruner": {"type": "median", "reduction_factor": 3}},
     'field "pruner.reduction_factor" does not apply to the median pruner'),
    ({"objective": {"task": "sentiment", "metric": "acc", "direction": "maximize", "validation": {"split": 0.2}}},
     'field "objective.metric": task "sentiment" has no metric "acc"'),
    ({"objective": {"task": "sentiment", "metric": "accuracy", "direction": "maximize",
                    "validation": {"path": str(REPO_ROOT / "data/test/sentiment_test.jsonl")}}},
     'is the test file of task "sentiment"'),
    ({"objective": {"task": "sentiment", "metric": "accuracy", "direction": "maximize"}},
     'field "objective.validation": the objective needs a validation set'),
    ({"objective": {"metric": "accuracy", "direction": "maximize", "validation": {"split": 0.2}}},
     'field "objective.task" is required for metric "accuracy"'),
    ({"recipe": "tiny2"}, 'field "recipe": no runnable recipe named "tiny2"'),
    ({"set": {"lora_dropuot": 0.1}}, 'unknown field "lora_dropuot" (did you mean "lora_dropout"?)'),
    ({"budget": {"total_steps": 10}, "set": {"max_steps": -1}}, 'field "budget.total_steps": the trials count epochs'),
]


@pytest.mark.parametrize("change,expected", BAD_SWEEPS, ids=[e[:40] for _, e in BAD_SWEEPS])
def test_bad_sweep_exits_2_naming_the_field(sweep_home, tmp_path, capsys, change, expected):
    sweeps = write_sweeps(tmp_path, {"bad": {**GRID, **change}})
    registry = (sweep_home / "finetune_configs.json").read_text()
    train = json.dumps(str(sweep_home / "train.jsonl"))
    (tmp_path / "finetune_configs.json").write_text(registry.replace('"train.jsonl"', train))
    assert main(["bad", "--sweeps", str(sweeps), "--dry-run"]) == 2
    error = capsys.readouterr().err
    assert error.startswith('error: sweep "bad" in ') and expected in error, error
    assert "Traceback" not in error


def test_unknown_sweep_and_broken_json_exit_2(tmp_path, capsys):
    sweeps = tmp_path / "sweeps.json"
    sweeps.write_text('{"grid": {"recipe": "tiny",\n  "space": }\n}')
    assert main(["grid", "--sweeps", str(sweeps)]) == 2
    assert f"{sweeps}:2:12 is not valid JSON" in capsys.readouterr().err
    write_sweeps(tmp_path, {"grid4": GRID})
    assert main(["gird4", "--sweeps", str(sweeps)]) == 2
    error = capsys.readouterr().err
    assert 'no sweep named "gird4"' in error and '(did you mean "grid4"?)' in error


def test_the_shipped_sweeps_validate(capsys):
    for name in json.loads((REPO_ROOT / "sweeps.json").read_text()):
        if not name.startswith("$"):
            assert main([name, "--dry-run"]) == 0, capsys.readouterr().err


def test_a_continued_tpe_study_does_not_repeat_its_first_draws(sweep_home, tmp_path):
    sweep = {"recipe": "tiny", "set": {"max_steps": 2},
             "space": {"learning_rate": {"type": "float", "low": 1e-4, "high": 0.05, "log": True}},
             "objective": {"metric": "validation_loss", "direction": "minimize", "validation": {"split": 0.25},
                           "report_every_steps": 2},
             "trials": 1, "sampler": {"type": "tpe", "seed": 0}}
    out = tmp_path / "tpe"
    assert main(["again", "--sweeps", str(write_sweeps(sweep_home, {"again": sweep})), "--output-dir", str(out)]) == 0
    # The same study continued by a new command (more trials asked for): its random start draws a new point.
    sweeps = write_sweeps(sweep_home, {"again": {**sweep, "trials": 2}})
    assert main(["again", "--sweeps", str(sweeps), "--output-dir", str(out)]) == 0
    first, second = load_study(out, "again").trials
    assert first.params["learning_rate"] != second.params["learning_rate"]


def checkout_copy(source, folder, **recipe_changes):
    """The registry, its data and sweeps file copied into another folder, as a second machine's checkout holds them
    (optionally with the base recipe changed)."""
    folder.mkdir()
    registry = json.loads((source / "finetune_configs.json").read_text())
    registry["tiny"].update(recipe_changes)
    (folder / "finetune_configs.json").write_text(json.dumps(registry))
    (folder / "train.jsonl").write_text((source / "train.jsonl").read_text())
    return write_sweeps(folder, {"shared": GRID})


def test_a_study_is_joined_from_a_checkout_in_another_folder_and_refused_when_the_recipe_differs(sweep_home,
                                                                                                   tmp_path):
    from lora.sweeps.spec import SweepError, load_sweep
    from lora.sweeps.study import open_study

    storage = f"sqlite:///{tmp_path / 'shared.sqlite3'}"  # stands in for the --storage URL all machines share
    first = checkout_copy(sweep_home, tmp_path / "alice-checkout")
    open_study(load_sweep("shared", first), tmp_path / "out-a", storage=storage)
    # The same search from a checkout elsewhere (another machine's path) joins the study.
    second = checkout_copy(sweep_home, tmp_path / "bob-checkout")
    assert open_study(load_sweep("shared", second), tmp_path / "out-b", storage=storage).study_name == "shared"
    # A checkout whose base recipe differs is another search: refused, naming it.
    changed = checkout_copy(sweep_home, tmp_path / "changed-checkout", learning_rate=0.02)
    with pytest.raises(SweepError, match="another definition"):
        open_study(load_sweep("shared", changed), tmp_path / "out-c", storage=storage)

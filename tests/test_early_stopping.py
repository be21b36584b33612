"""Early stopping: a run whose validation metric stops improving stops after `patience` evaluations and publishes the
best evaluated step's adapter; the run record says which step and why; bad fields are refused naming them."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO_ROOT
from lora.core.errors import RecipeError
from lora.recipes.registry import resolve_recipe
from lora.training.run import run_recipe

SENTIMENT = REPO_ROOT / "data/train/sentiment_train.jsonl"


def write(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def registry(tmp_path, recipes):
    path = tmp_path / "finetune_configs.json"
    path.write_text(json.dumps(recipes))
    return path


def contradicting_data(tmp_path):
    """Training says every headline is positive, validation that the same headlines are negative: once the adapter
    has learnt the answer format, learning more makes the validation loss worse."""
    contexts = [json.loads(line)["context"] for line in SENTIMENT.read_text().splitlines()[:32]]
    train = write(tmp_path / "train.jsonl", [{"context": c, "target": "positive"} for c in contexts])
    validation = write(tmp_path / "validation.jsonl", [{"context": c, "target": "negative"} for c in contexts[:8]])
    return train, validation


@pytest.mark.slow
def test_early_stopping_stops_and_publishes_the_best_step(tmp_path, tiny_model_dir):
    train, validation = contradicting_data(tmp_path)
    common = {"base_model": str(tiny_model_dir), "dataset_path": train, "quant_bits": None, "lora_dropout": 0.0,
              "learning_rate": 0.01, "lr_scheduler_type": "constant", "warmup_steps": 0, "batch_size": 4,
              "logging_steps": 1, "max_steps": 12}
    path = registry(tmp_path, {"stop": {**common, "validation_path": validation, "eval_steps": 1,
                                        "early_stopping_patience": 2}})
    result = run_recipe(resolve_recipe("stop", path), tmp_path / "stop", scoring=None)
    record = json.loads((tmp_path / "stop" / "run_summary.json").read_text())["early_stopping"]
    steps, losses = zip(*record["evaluations"])
    best = steps[losses.index(min(losses))]
    assert steps == tuple(range(1, len(steps) + 1)) and len(steps) < 12  # it stopped before max_steps
    assert record["best_step"] == best == record["published_step"] and record["stopped_at_step"] == best + 2
    assert all(loss > min(losses) for loss in losses[best:])  # two evaluations without improvement, then the stop
    assert f"did not improve for 2 evaluation(s) after step {best}; stopped at step {best + 2}" in record["reason"]
    assert result.summary["steps"] == best + 2

    # The published adapter is the best step's: the same weights as a run that stopped there.
    path = registry(tmp_path, {"best_only": {**common, "max_steps": best}})
    run_recipe(resolve_recipe("best_only", path), tmp_path / "best", scoring=None)
    published = load_file(tmp_path / "stop" / "adapter_model.safetensors")
    expected = load_file(tmp_path / "best" / "adapter_model.safetensors")
    assert published.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(published[key], expected[key], rtol=0, atol=0, msg=key)

@pytest.mark.parametrize(("fields", "fragment"), [
    ({"early_stopping_patience": 2}, 'field "early_stopping_patience" counts evaluations'),
    ({"early_stopping_patience": 0, "eval_steps": 1, "validation_split": 0.1}, 'field "early_stopping_patience"'),
    ({"early_stopping_metric": "eval_loss"}, 'field "early_stopping_metric" has no effect'),
    ({"early_stopping_patience": 2, "eval_steps": 1, "validation_split": 0.1,
      "early_stopping_metric": "sentimnt:accuracy"}, 'unknown task "sentimnt" (did you mean "sentiment"?)'),
    ({"early_stopping_patience": 2, "eval_steps": 1, "validation_split": 0.1,
      "early_stopping_metric": "sentiment:f1"}, 'task "sentiment" has no metric "f1"'),
    ({"early_stopping_patience": 2, "eval_steps": 1, "validation_split": 0.1, "early_stopping_metric": "loss"},
     'neither "eval_loss" nor "TASK:METRIC"'),
])
def test_bad_early_stopping_fields_are_refused_naming_them(tmp_path, fields, fragment):
    path = registry(tmp_path, {"r": {"base_model": "m", "dataset_path": str(SENTIMENT), **fields}})
    with pytest.raises(RecipeError) as caught:
        resolve_recipe("r", path)
    assert fragment in str(caught.value)


def test_early_stopping_on_a_task_metric_of_the_validation_rows(tmp_path, tiny_model_dir):
    from lora.finetune import harness_scoring

    train, validation = contradicting_data(tmp_path)
    path = registry(tmp_path, {"r": {
        "base_model": str(tiny_model_dir), "dataset_path": train, "validation_path": validation, "quant_bits": None,
        "learning_rate": 0.01, "lr_scheduler_type": "constant", "warmup_steps": 0, "batch_size": 4, "max_steps": 4,
        "eval_steps": 2, "early_stopping_patience": 5, "early_stopping_metric": "sentiment:accuracy"}})
    result = run_recipe(resolve_recipe("r", path), tmp_path / "out", scoring=harness_scoring())
    record = result.summary["early_stopping"]
    assert [step for step, _ in record["evaluations"]] == [2, 4]
    assert all(0 <= value <= 1 for _, value in record["evaluations"])  # accuracy on the 8 validation rows
    assert record["stopped_at_step"] is None and "trained to the end (step 4)" in record["reason"]

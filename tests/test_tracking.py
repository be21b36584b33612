"""Experiment tracking with the real libraries (TensorBoard event files, an MLflow file store) on tiny runs, and the
model card's hub metadata: what the trackers and the card show equals the run record."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
from huggingface_hub import ModelCard
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

from conftest import REPO_ROOT
from lora.core.files import new_file_mode
from lora.finetune import harness_scoring, main
from lora.recipes.registry import load_schema, resolve_recipe
from lora.training.grpo import build_grpo_config
from lora.training.run import run_recipe
from lora.training.run_record import score_figures
from lora.training.tracking import TRACKERS

TINY = {
    "dataset_path": str(REPO_ROOT / "data/train/sentiment_train.jsonl"), "quant_bits": None,
    "max_train_examples": 32, "batch_size": 8, "learning_rate": 0.01, "lr_scheduler_type": "constant",
    "warmup_steps": 0, "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "logging_steps": 1, "max_seq_length": 96,
    "eval_tasks": ["sentiment"], "eval_limit": 4,
}


@pytest.fixture(autouse=True)
def environment_restored():
    """The runner sets tracker variables (MLFLOW_TRACKING_URI, ...) for its run; later tests start clean."""
    saved = dict(os.environ)
    for variable in ("MLFLOW_TRACKING_URI", "MLFLOW_ALLOW_FILE_STORE", "TENSORBOARD_LOGGING_DIR"):
        os.environ.pop(variable, None)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="module")
def registry(tmp_path_factory, tiny_model_dir):
    path = tmp_path_factory.mktemp("tracking-registry") / "finetune_configs.json"
    path.write_text(json.dumps({
        "tiny_tracked": {**TINY, "base_model": str(tiny_model_dir), "max_steps": 3, "save_steps": 2,
                         "report_to": "tensorboard"},
        "tiny_grpo_tracked": {"base_model": str(tiny_model_dir), "dataset_path": TINY["dataset_path"],
                              "trainer": "grpo", "quant_bits": None, "lora_r": 4, "lora_alpha": 8,
                              "max_train_examples": 16, "max_steps": 2, "batch_size": 4, "num_generations": 2,
                              "max_completion_length": 2, "reward_functions": ["format"], "logging_steps": 1,
                              "report_to": "tensorboard", "run_name": "grpo-smoke"},
    }, indent=2))
    return path


def scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of a TensorBoard log folder as TensorBoard shows it: (step, value), purged events left out."""
    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {tag: [(event.step, event.value) for event in accumulator.Scalars(tag)]
            for tag in accumulator.Tags()["scalars"]}


def logged_losses(output_dir: Path) -> list[tuple[int, float]]:
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return [(entry["step"], entry["loss"]) for entry in state["log_history"] if "loss" in entry]


def assert_same_curve(logged: list[tuple[int, float]], expected: list[tuple[int, float]]) -> None:
    """Same steps, same values up to float32 (TensorBoard stores scalars as float32)."""
    assert [step for step, _ in logged] == [step for step, _ in expected]
    assert [value for _, value in logged] == pytest.approx([value for _, value in expected], rel=1e-6)


def test_report_to_names_are_the_trainers_integrations():
    schema = load_schema()["properties"]["report_to"]["oneOf"]
    assert set(schema[0]["enum"]) - {"none", "all"} == set(INTEGRATION_TO_CALLBACK) == set(TRACKERS)
    assert set(schema[1]["items"]["enum"]) == set(INTEGRATION_TO_CALLBACK)


def test_recipe_fields_reach_the_sft_and_grpo_trainers(registry):
    recipe = resolve_recipe("tiny_tracked", registry, ["report_to=[\"tensorboard\", \"mlflow\"]"])
    assert recipe["run_name"] == "tiny_tracked"  # default: the recipe name
    grpo = build_grpo_config(resolve_recipe("tiny_grpo_tracked", registry), Path("unused"), stop_ids=[0])
    assert grpo.report_to == ["tensorboard"] and grpo.run_name == "grpo-smoke"


def test_tensorboard_log_equals_the_run_record_and_continues_on_resume(registry, tmp_path):
    out = tmp_path / "run"
    run_recipe(resolve_recipe("tiny_tracked", registry), out, scoring=harness_scoring())
    log_dir = out / "logs" / "tensorboard"
    first = scalars(log_dir)
    summary = json.loads((out / "run_summary.json").read_text())
    assert_same_curve(first["train/loss"], logged_losses(out))
    assert [step for step, _ in first["train/loss"]] == [1, 2, 3]
    for task, metrics in score_figures(summary["eval_after"], harness_scoring().task_facts).items():
        for metric, value in metrics.items():
            assert first[f"eval/after/{task}/{metric}"] == [(3, pytest.approx(value, rel=1e-6))]
            assert first[f"eval/before/{task}/{metric}"] == [
                (3, pytest.approx(summary["eval_before"][task][metric], rel=1e-6))]
    assert first["train/run/final_loss"] == [(3, pytest.approx(summary["final_loss"], rel=1e-6))]
    assert first["train/run/tokens_seen"] == [(3, summary["tokens_seen"])]

    # Continue from step 2 to step 4 in the same folder: one log, each step once, step 3 from the resumed run.
    resumed = resolve_recipe("tiny_tracked", registry, ["max_steps=4"])
    run_recipe(resumed, out, resume=str(out / "checkpoints" / "checkpoint-2"), scoring=harness_scoring())
    after = scalars(log_dir)
    assert len(list(log_dir.glob("events.out.tfevents.*"))) == 2
    assert_same_curve(after["train/loss"], logged_losses(out))
    assert [step for step, _ in after["train/loss"]] == [1, 2, 3, 4]
    summary = json.loads((out / "run_summary.json").read_text())
    accuracy = summary["eval_after"]["sentiment"]["accuracy"]
    assert after["eval/after/sentiment/accuracy"] == [(4, pytest.approx(accuracy, rel=1e-6))]


def test_grpo_rewards_reach_tensorboard(registry, tmp_path):
    out = tmp_path / "grpo"
    run_recipe(resolve_recipe("tiny_grpo_tracked", registry), out, scoring=harness_scoring())
    logged = scalars(out / "logs" / "tensorboard")
    history = json.loads((out / "run_summary.json").read_text())["rewards"]["reward_history"]
    assert_same_curve(logged["train/reward"], [(entry["step"], entry["reward"]) for entry in history])
    assert logged["train/run/final_reward"] == [(2, pytest.approx(history[-1]["reward"], rel=1e-6))]


def test_mlflow_file_store_in_the_run_folder_holds_the_run_record(registry, tmp_path):
    import mlflow

    out = tmp_path / "run"
    run_recipe(resolve_recipe("tiny_tracked", registry, ["report_to=mlflow", "run_name=tiny-mlflow"]), out,
               scoring=harness_scoring())
    client = mlflow.MlflowClient(tracking_uri=(out / "logs" / "mlflow").as_uri())
    runs = client.search_runs(experiment_ids=[e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1  # the figures logged after training went to the training run, not a new one
    run = runs[0]
    assert run.info.run_name == "tiny-mlflow" and run.info.status == "FINISHED"
    losses = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss")]
    assert losses == logged_losses(out)
    summary = json.loads((out / "run_summary.json").read_text())
    assert run.data.metrics["eval_after/sentiment/accuracy"] == summary["eval_after"]["sentiment"]["accuracy"]
    assert run.data.metrics["run/final_loss"] == summary["final_loss"]
    assert run.data.params["learning_rate"] == "0.01"

    # A tracking URI the user set is theirs: nothing goes to the run folder.
    elsewhere = tmp_path / "team-store"
    os.environ["MLFLOW_TRACKING_URI"] = elsewhere.as_uri()
    run_recipe(resolve_recipe("tiny_tracked", registry, ["report_to=mlflow", "max_steps=1", "eval_tasks=[]"]),
               tmp_path / "second", scoring=harness_scoring())
    assert not (tmp_path / "second" / "logs").exists()
    assert mlflow.MlflowClient(tracking_uri=elsewhere.as_uri()).search_runs(experiment_ids=["0"])


def test_a_tracker_not_installed_is_exit_2_before_any_model_loads(registry, tmp_path, capsys):
    absent = next((name for name in ("wandb", "swanlab", "neptune") if importlib.util.find_spec(name) is None), None)
    if absent is None:
        pytest.skip("wandb, swanlab and neptune are all installed here: runs where one of them is not (as with "
                    "requirements.txt alone)")
    out = tmp_path / "run"
    code = main(["tiny_tracked", "--registry", str(registry), "--output-dir", str(out), "--set",
                 f'report_to=["tensorboard", "{absent}"]'])
    captured = capsys.readouterr()
    assert code == 2 and "Traceback" not in captured.err
    assert f'field "report_to" names {absent}' in captured.err and f"pip install {absent}" in captured.err
    assert "model loaded" not in captured.out and not out.exists()


def test_model_card_carries_the_scores_as_model_index_and_no_local_path(registry, tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    run_recipe(resolve_recipe("tiny_tracked", registry, ["report_to=none"]), out, scoring=harness_scoring())
    summary = json.loads((out / "run_summary.json").read_text())
    card = ModelCard.load(out / "README.md")
    results = {(r.task_name, r.metric_type): r for r in card.data.eval_results}
    expected = score_figures(summary["eval_after"], harness_scoring().task_facts)["sentiment"]
    assert set(results) == {("sentiment", metric) for metric in expected} and len(expected) == 3
    for (task, metric), result in results.items():
        assert result.metric_value == summary["eval_after"][task][metric]
        assert (result.task_type, result.dataset_type, result.dataset_split) == ("text-classification", task, "test")
    assert card.data.model_name == "tiny_tracked" and card.data.library_name == "peft"
    assert card.data.base_model is None  # a local folder is no hub id

    text = (out / "README.md").read_text()
    for local in (str(tiny_model_dir), str(tmp_path), str(Path.home()), str(REPO_ROOT)):
        assert local not in text
    assert str(tiny_model_dir) in summary["model_source"]  # the run record keeps where the weights came from
    assert "weights from a local model folder" in text

    # Every output file has the mode a plain open() gives (run_summary.json was 0600: written through mkstemp).
    modes = {path.name: path.stat().st_mode & 0o777 for path in out.iterdir() if path.is_file()}
    assert set(modes.values()) == {new_file_mode()}, modes

"""Our harness and lm-evaluation-harness agree on an adapter trained here: a tiny Llama learns a keyword -> label
task through the runner, then both score the exported task, lm-eval through its Python API on the same loaded
model and through its CLI with `peft=` on the unquantised base."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from peft import PeftModel

from conftest import REPO_ROOT
from eval.harness.evaluation import evaluate_tasks, prepare_tasks, task_targets
from eval.harness.lm_eval_export import export_tasks
from lora.finetune import harness_scoring
from lora.models.loading import load_base_model, load_tokenizer
from lora.models.quantisation import QuantisationSettings
from lora.recipes.registry import resolve_recipe
from lora.training.run import run_recipe

LABELS = ("negative", "neutral", "positive")
WORDS = ("fell", "met", "rose")  # the label is the word's: learnable in a few steps by a random tiny model


def keyword_rows(count: int, offset: int) -> list[dict]:
    return [{"context": f"Instruction: What is the sentiment of this news?\nInput: Shares {WORDS[i % 3]} "
                        f"{(i + offset) % 10}.\nAnswer: ", "target": LABELS[i % 3]} for i in range(count)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    folder = tmp_path_factory.mktemp("agreement")
    train = write_jsonl(folder / "train.jsonl", keyword_rows(48, 0))
    test = write_jsonl(folder / "test.jsonl", keyword_rows(60, 3))
    registry = folder / "finetune_configs.json"
    registry.write_text(json.dumps({"tiny_keyword_sentiment": {
        "base_model": str(tiny_model_dir), "dataset_path": str(train), "quant_bits": None, "lora_r": 8,
        "lora_alpha": 16, "lora_dropout": 0.0, "max_steps": 24, "batch_size": 8, "learning_rate": 0.01,
        "warmup_steps": 0, "lr_scheduler_type": "constant", "logging_steps": 4, "max_seq_length": 64}}))
    out = folder / "adapter"
    run_recipe(resolve_recipe("tiny_keyword_sentiment", registry), out, scoring=harness_scoring())
    prepared = prepare_tasks(["sentiment"], data_overrides={"sentiment": str(test)})
    tokenizer = load_tokenizer(str(out))
    export = folder / "lm_eval_tasks"
    names = export_tasks([(task, rows, task_targets(task, rows)) for task, rows in prepared], export,
                         template="plain", tokenizer=tokenizer)
    base = load_base_model(str(tiny_model_dir), QuantisationSettings.unquantised())
    model = PeftModel.from_pretrained(base, str(out)).eval()
    ours = evaluate_tasks(model, tokenizer, ["sentiment"], prompt_template="plain", mode="choice",
                          data_overrides={"sentiment": str(test)}, progress=False, out_dir=folder / "ours")
    predictions = [json.loads(line)["prediction"]
                   for line in (folder / "ours" / "sentiment.predictions.jsonl").read_text().splitlines()]
    return {"folder": folder, "adapter": out, "export": export, "name": names[0], "model": model,
            "tokenizer": tokenizer, "ours": ours["sentiment"], "predictions": predictions}


def lm_eval_choices(samples: list[dict]) -> list[str]:
    """The label lm-eval picked per document (argmax of its log-likelihoods, first of equal ones), in doc order."""
    picked = {}
    for sample in samples:
        # (log-likelihood, is_greedy) per label; the CLI's samples file writes both as strings
        log_likelihoods = [float(response[0]) for response in sample["filtered_resps"]]
        picked[sample["doc_id"]] = sample["doc"]["choices"][max(range(len(log_likelihoods)),
                                                                key=log_likelihoods.__getitem__)]
    return [picked[i] for i in range(len(picked))]


def assert_agreement(trained, accuracy: float, weighted_f1: float, choices: list[str]) -> None:
    ours = trained["ours"]
    # the adapter learnt the task well above chance (1/3): agreeing on a model that prefers nothing proves less
    assert ours["accuracy"] >= 0.5, ours
    same = sum(a == b for a, b in zip(choices, trained["predictions"], strict=True)) / len(choices)
    assert same >= 0.99, (same, choices, trained["predictions"])
    assert abs(accuracy - ours["accuracy"]) <= 0.01
    assert abs(weighted_f1 - ours["weighted_f1"]) <= 0.01


def test_lm_eval_python_api_on_the_same_loaded_model_agrees(trained):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=trained["model"], tokenizer=trained["tokenizer"], batch_size=16)
    results = simple_evaluate(model=lm, tasks=[trained["name"]], task_manager=TaskManager(
        include_path=str(trained["export"])), log_samples=True, bootstrap_iters=0)
    scores = results["results"][trained["name"]]
    assert_agreement(trained, scores["accuracy,none"], scores["weighted_f1,none"],
                     lm_eval_choices(results["samples"][trained["name"]]))


def test_lm_eval_cli_with_peft_on_the_unquantised_base_agrees(trained, tiny_model_dir):
    out = trained["folder"] / "lm_eval_cli"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    command = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
               f"pretrained={tiny_model_dir},peft={trained['adapter']},tokenizer={trained['adapter']}",
               "--include_path", str(trained["export"]), "--tasks", trained["name"], "--device", "cpu",
               "--batch_size", "16", "--output_path", str(out), "--log_samples"]
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    scores = json.loads(next(out.rglob("results_*.json")).read_text())["results"][trained["name"]]
    samples = [json.loads(line) for line in next(out.rglob(f"samples_{trained['name']}_*.jsonl")).read_text()
               .splitlines()]
    assert_agreement(trained, scores["accuracy,none"], scores["weighted_f1,none"], lm_eval_choices(samples))


def test_export_replaces_its_own_folder_and_refuses_any_other(tmp_path, tiny_model_dir):
    from lora.core.errors import UserError

    prepared = prepare_tasks(["sentiment", "calc"], limit=4)
    tokenizer = load_tokenizer(str(tiny_model_dir))
    items = [(task, rows, task_targets(task, rows)) for task, rows in prepared]
    export = tmp_path / "tasks"
    assert export_tasks(items, export, template="chat", tokenizer=tokenizer) == ["lora_recipes_sentiment",
                                                                                  "lora_recipes_calc"]
    documents = [json.loads(line) for line in (export / "lora_recipes_calc.jsonl").read_text().splitlines()]
    assert documents[0]["prompt"].endswith("<|assistant|>")  # the rule's generation prompt, chat turn rendered
    assert documents[0]["expected"] == float(items[1][1][0]["target"])
    assert "output_type: generate_until" in (export / "lora_recipes_calc.yaml").read_text()
    export_tasks(items[:1], export, template="plain", tokenizer=tokenizer)  # an earlier export is replaced whole
    assert not (export / "lora_recipes_calc.yaml").exists()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="is not an lm-eval export written by this tool"):
        export_tasks(items, tmp_path / "other", template="plain", tokenizer=tokenizer)
    assert [p.name for p in (tmp_path / "other").iterdir()] == ["notes.txt"]

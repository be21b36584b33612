"""The harness on the tiny Llama: shared-prefix choice scoring, generation, result files, train-mode restore."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model

from conftest import bnb_defaults
from eval.harness.choices import MIN_SHARED_PREFIX, common_prefix_length, score_choices, score_choices_one_row_per_label
from eval.harness.evaluation import evaluate_tasks
from lora.models.loading import load_base_model, load_tokenizer
from lora.models.quantisation import QuantisationSettings
from lora.prompts.generation import generate_greedy
from lora.prompts.templates import encode_completion, encode_prompt

LABELS = ["negative", "neutral", "positive"]
HEADLINES = ["Shares rose after revenue beat expectations", "The bank reported a loss and cut its dividend",
             "The board will meet on Tuesday", "Net income 1000 million USD", "Margin per share fell"]


def sentiment_rows(count: int) -> list[dict]:
    return [{"context": f"Instruction: What is the sentiment of this news? Please choose an answer from "
                        f"{{negative/neutral/positive}}.\nInput: {HEADLINES[i % 5]} {'!' * (i % 4)}\nAnswer: ",
             "target": LABELS[i % 3]} for i in range(count)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(str(tiny_model_dir))


@pytest.mark.parametrize("quant_bits", [None, 4, 8])
def test_shared_prefix_scores_equal_one_row_per_label(tiny_model_dir, tokenizer, quant_bits):
    model = load_base_model(str(tiny_model_dir), bnb_defaults(quant_bits)).eval()
    labels = LABELS + ["strong buy on revenue"]  # a multi-token label exercises the per-label mask
    for template in ("plain", "chat"):
        rows = sentiment_rows(7)
        prompts = [encode_prompt(row["context"], template, tokenizer) for row in rows]
        choices = [encode_completion(rows[0]["context"], label, template, tokenizer, close=False).answer_ids
                   for label in labels]
        assert max(len(c) for c in choices) > 1
        assert common_prefix_length(prompts) >= MIN_SHARED_PREFIX  # the cross-example prefix cache is used
        shared = torch.tensor(score_choices(model, prompts, choices, pad_id=tokenizer.pad_token_id, batch_size=3))
        uncached = torch.tensor(score_choices(model, prompts, choices, pad_id=tokenizer.pad_token_id, batch_size=4,
                                              share_prefix=False))
        plain = torch.tensor(score_choices_one_row_per_label(model, prompts, choices, pad_id=tokenizer.pad_token_id,
                                                             batch_size=5))
        torch.testing.assert_close(shared, plain, atol=2e-4, rtol=1e-4)
        torch.testing.assert_close(uncached, plain, atol=2e-4, rtol=1e-4)


def test_batched_left_padded_generation_equals_one_at_a_time(tiny_model_dir, tokenizer):
    model = load_base_model(str(tiny_model_dir), QuantisationSettings.unquantised()).eval()
    prompts = [encode_prompt(row["context"], "plain", tokenizer) for row in sentiment_rows(5)]
    assert len({len(p) for p in prompts}) > 1  # padding is really needed
    arguments = {"max_new_tokens": 5, "pad_id": tokenizer.pad_token_id, "stop_ids": [tokenizer.eos_token_id]}
    batched = generate_greedy(model, prompts, batch_size=5, **arguments)
    single = generate_greedy(model, prompts, batch_size=1, **arguments)
    assert batched == single
    with torch.no_grad():
        reference = model.generate(torch.tensor([prompts[0]]), max_new_tokens=5, do_sample=False,
                                   pad_token_id=tokenizer.pad_token_id)
    expected = reference[0, len(prompts[0]):].tolist()
    expected = expected[: expected.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in expected else expected
    assert single[0] == expected


def test_evaluate_tasks_on_a_peft_model_in_train_mode(tiny_model_dir, tokenizer, tmp_path, capsys, repo_root):
    """What the runner does: score right after attaching the identity adapter, with the model in train mode."""
    sentiment = write_jsonl(tmp_path / "sentiment.jsonl", sentiment_rows(10))
    numbers = write_jsonl(tmp_path / "numbers.jsonl", [{"context": f"{i} plus 1 is\nAnswer: ", "target": str(i + 1)}
                                                       for i in range(4)])
    base = load_base_model(str(tiny_model_dir), QuantisationSettings.unquantised())
    base_scores = evaluate_tasks(base, tokenizer, ["sentiment"], prompt_template="plain", progress=False,
                                 data_overrides={"sentiment": str(sentiment)}, out_dir=tmp_path / "base")
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj"]))
    model.train()
    # A registry task whose (optional) data is absent is skipped with a note; a file named in data_overrides must
    # exist (tests/test_promised_exit_2.py).
    tasks = json.loads((repo_root / "eval/tasks.json").read_text())
    tasks["tasks"]["calc"]["path"] = str(tmp_path / "absent.jsonl")
    task_registry = tmp_path / "tasks.json"
    task_registry.write_text(json.dumps(tasks))
    results = evaluate_tasks(
        model, tokenizer, ["sentiment", "calc", "sums"], prompt_template="plain", limit=8, batch_size=4,
        out_dir=tmp_path / "eval", progress=False, registry=task_registry,
        data_overrides={"sentiment": str(sentiment), "sums": str(numbers)},
    )
    assert model.training and all(m.training for m in model.modules())  # every module back in train mode
    assert 'task "calc" skipped: no data at' in capsys.readouterr().err
    assert set(results) == {"sentiment", "sums"}

    sentiment_result = results["sentiment"]
    assert sentiment_result["mode"] == "choice" and sentiment_result["n"] == 8
    assert {"accuracy", "weighted_f1", "macro_f1", "data_sha256", "versions", "seconds"} <= set(sentiment_result)
    predictions_file = tmp_path / "eval" / "sentiment.predictions.jsonl"
    records = [json.loads(line) for line in predictions_file.read_text().splitlines()]
    assert len(records) == 8 and set(records[0]) == {"id", "target", "prediction", "raw", "correct", "scores"}
    assert sentiment_result["accuracy"] == pytest.approx(sum(r["correct"] for r in records) / 8)
    assert json.loads((tmp_path / "eval" / "sentiment.json").read_text())["accuracy"] == sentiment_result["accuracy"]
    # the identity-initialised adapter scores exactly like the bare base model
    base_records = (tmp_path / "base" / "sentiment.predictions.jsonl").read_text().splitlines()[:8]
    for record, base_record in zip(records, map(json.loads, base_records), strict=True):
        assert record["scores"] == pytest.approx(base_record["scores"], abs=1e-5)
    assert base_scores["sentiment"]["n"] == 10

    sums = results["sums"]  # a name the registry does not know: inferred from its targets as numeric
    assert sums["kind"] == "numeric" and sums["mode"] == "generate" and "unparsed" in sums

"""eval/evaluate.py and eval/compare.py as a user runs them (subprocesses), plus data/download.py offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from eval.harness.choices import score_row_choices
from lora.models.loading import load_base_model, load_tokenizer
from lora.models.quantisation import QuantisationSettings
from lora.prompts.templates import encode_completion

LABELS = ["negative", "neutral", "positive"]
RECIPE = {"name": "tiny_sentiment", "quant_bits": 4, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
          "bnb_4bit_compute_dtype": "float32", "dtype": "float32", "prompt_template": "chat", "use_dora": False,
          "eval_tasks": ["sentiment"], "eval_limit": 6}


def run(repo_root, *args, timeout=300):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(repo_root)}
    return subprocess.run([sys.executable, *map(str, args)], cwd=repo_root, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def sentiment_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "sentiment.jsonl"
    rows = [{"context": f"Input: shares {'rose' if i % 2 else 'fell'} {i}\nAnswer: ", "target": LABELS[i % 3]}
            for i in range(8)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory):
    """A LoRA adapter made with peft directly (non-zero B, so it changes outputs) plus the runner's recipe.json."""
    folder = tmp_path_factory.mktemp("adapter")
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    config = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    get_peft_model(base, config).save_pretrained(folder)
    load_tokenizer(str(tiny_model_dir)).save_pretrained(folder)
    (folder / "recipe.json").write_text(json.dumps({**RECIPE, "base_model": str(tiny_model_dir)}))
    return folder


def test_recorded_eval_mode_is_the_default_and_the_flag_overrides_it(repo_root, adapter_dir, sentiment_file, tmp_path):
    recipe_file = adapter_dir / "recipe.json"
    original = recipe_file.read_text()
    recipe_file.write_text(json.dumps({**json.loads(original), "eval_mode": "generate"}))
    try:
        common = ["eval/evaluate.py", "--adapter", adapter_dir, "--data", f"sentiment={sentiment_file}",
                  "--no-progress"]
        recorded = run(repo_root, *common, "--out", tmp_path / "recorded")
        flagged = run(repo_root, *common, "--out", tmp_path / "flagged", "--mode", "choice")
    finally:
        recipe_file.write_text(original)
    assert recorded.returncode == 0 and flagged.returncode == 0, recorded.stderr + flagged.stderr
    assert json.loads((tmp_path / "recorded" / "sentiment.json").read_text())["mode"] == "generate"
    assert json.loads((tmp_path / "flagged" / "sentiment.json").read_text())["mode"] == "choice"


def test_adapter_is_scored_on_its_recorded_base_quantisation_and_template(repo_root, adapter_dir, sentiment_file,
                                                                          tiny_model_dir):
    result = run(repo_root, "eval/evaluate.py", "--adapter", adapter_dir, "--data", f"sentiment={sentiment_file}",
                 "--no-progress", "--with-base")
    assert result.returncode == 0, result.stderr
    assert "| sentiment | choice | 6 |" in result.stdout  # eval_tasks and eval_limit from recipe.json
    record = json.loads((adapter_dir / "eval" / "sentiment.json").read_text())
    assert record["quant_bits"] == 4 and record["prompt_template"] == "chat" and record["n"] == 6
    assert record["adapter"] == str(adapter_dir)
    recorded, recorded_base = ([json.loads(line)["scores"] for line in
                                (adapter_dir / folder / "sentiment.predictions.jsonl").read_text().splitlines()]
                               for folder in ("eval", "eval_base"))
    base_record = json.loads((adapter_dir / "eval_base" / "sentiment.json").read_text())
    assert base_record["adapter"] is None and base_record["quant_bits"] == 4

    # The same scores in-process: 4-bit base as recorded, adapter attached; and the bare base scores differently.
    tokenizer = load_tokenizer(str(adapter_dir))
    base = load_base_model(str(tiny_model_dir), QuantisationSettings.from_recipe(RECIPE)).eval()
    rows = [json.loads(line) for line in sentiment_file.read_text().splitlines()][:6]
    pairs = [[(pair.prompt_ids, pair.answer_ids) for pair in
              (encode_completion(row["context"], label, "chat", tokenizer, close=False) for label in LABELS)]
             for row in rows]
    base_scores = torch.tensor(score_row_choices(base, pairs, pad_id=tokenizer.pad_token_id))
    adapted = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    adapter_scores = torch.tensor(score_row_choices(adapted, pairs, pad_id=tokenizer.pad_token_id))
    def as_tensor(score_dicts):
        return torch.tensor([[scores[label] for label in LABELS] for scores in score_dicts])

    torch.testing.assert_close(adapter_scores, as_tensor(recorded), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(base_scores, as_tensor(recorded_base), atol=1e-4, rtol=1e-4)  # --with-base
    assert (adapter_scores - base_scores).abs().max() > 1e-3

    # the side-by-side table evaluate.py printed, and the same from compare.py (base column from eval_base/)
    row = f"| sentiment | accuracy | 6 | {base_record['accuracy']:.3f} | {record['accuracy']:.3f} " \
          f"({record['accuracy'] - base_record['accuracy']:+.3f}) |"
    assert row in result.stdout
    png = adapter_dir.parent / "chart.png"
    compared = run(repo_root, "eval/compare.py", adapter_dir, "--png", png)
    assert compared.returncode == 0, compared.stderr
    assert row in compared.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--tasks", "sentimnt"], 'error: unknown task "sentimnt" (did you mean "sentiment"?)'),
        (["--tasks", "sentiment", "--data", "sentiment={bad}"], '{bad}:3: missing "target"'),
        (["--tasks", "sentiment", "--data", "sentiment={off_label}"],
         '{off_label}:1: target "bullish" is not one of the labels of task "sentiment"'),
    ],
)
def test_user_errors_exit_2_before_loading_a_model(repo_root, tiny_model_dir, tmp_path, arguments, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"context": "a", "target": "positive"}\n\n{"context": "b"}\n')
    off_label = tmp_path / "off.jsonl"
    off_label.write_text('{"context": "a", "target": "bullish"}\n')
    arguments = [a.format(bad=bad, off_label=off_label) for a in arguments]
    result = run(repo_root, "eval/evaluate.py", "--base-model", tiny_model_dir, *arguments, timeout=60)
    assert result.returncode == 2
    assert message.format(bad=bad, off_label=off_label) in result.stderr
    assert "Traceback" not in result.stderr


def test_adapter_whose_base_cannot_be_loaded_exits_2(repo_root, tmp_path, tiny_model_dir):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path":
                                                             str(tmp_path / "gone")}))
    result = run(repo_root, "eval/evaluate.py", "--adapter", adapter, "--tasks", "sentiment", timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"the base model of adapter {adapter} cannot be loaded" in result.stderr
    # a folder that exists but holds no model weights fails as cleanly, after the check of the records
    not_a_model = tmp_path / "empty_model"
    not_a_model.mkdir()
    (not_a_model / "config.json").write_text("{}")
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path":
                                                             str(not_a_model)}))
    result = run(repo_root, "eval/evaluate.py", "--adapter", adapter, "--tasks", "sentiment", timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr


def test_download_fails_with_a_clear_message_offline(repo_root):
    sys.path.insert(0, str(repo_root / "data"))
    try:
        import download
    finally:
        sys.path.remove(str(repo_root / "data"))
    with pytest.raises(download.DownloadError, match="looks offline"):
        download.fetch("http://127.0.0.1:9/fpb_test.jsonl")  # nothing listens on the discard port
    row = download.sentence_row([("By", 0), ("Ann", 1), ("Lee", 2), ("of", 0), ("Bank", 5), ("of", 6), ("Oslo", 6),
                                 ("in", 0), ("Oslo", 3), ("Lee", 2)])
    assert row["target"] == "Ann Lee, PER; Bank of Oslo, ORG; Oslo, LOC; Lee, PER"
    assert row["context"].endswith("Input: By Ann Lee of Bank of Oslo in Oslo Lee\nAnswer: ")

"""Rows, prompts and tokens: errors carry file:line, the loss sees only the answer, packing changes nothing."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lora.core.errors import DataError, UserError
from lora.prompts.rows import load_rows
from lora.prompts.templates import IGNORE_INDEX, answer_suffix, encode_completion, encode_prompt, prompt_text
from lora.training.sft_data import build_collator, build_datasets, encode_example

BAD_ROWS = [
    ('{"context": "a", "target": "b"}\n{"context": "a", "target": \n', ":2: not valid JSON"),
    ('["context", "target"]\n', ":1: expected a JSON object"),
    ('{"context": "a"}\n', ':1: missing "target" (row has context; expected context, target)'),
    ('{"context": "a", "target": 3}\n', ':1: "target" must be a string, got int'),
    ("\n\n", "has no rows"),
]


@pytest.mark.parametrize(("text", "fragment"), BAD_ROWS)
def test_malformed_rows_name_file_and_line(tmp_path, text, fragment):
    path = tmp_path / "rows.jsonl"
    path.write_text(text)
    with pytest.raises(DataError) as caught:
        load_rows(path)
    assert fragment in str(caught.value) and str(path) in str(caught.value)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_rows(tmp_path / "nope.jsonl")


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


ROW = {"context": "Instruction: What is the sentiment?\nInput: Shares rose.\nAnswer: ", "target": "positive"}


@pytest.mark.parametrize("template", ["plain", "chat", "### Question\n{context}"])
def test_loss_sees_only_the_answer_and_its_end(tokenizer, template):
    example = encode_example(ROW, template, tokenizer, max_seq_length=512)
    prompt = encode_prompt(ROW["context"], template, tokenizer)
    answer = example["input_ids"][len(prompt):]
    assert example["labels"] == [IGNORE_INDEX] * len(prompt) + answer
    # the answer is the target and its closing text, led by the whitespace the prompt ended with
    text = prompt_text(ROW["context"], template, tokenizer)
    assert tokenizer.decode(answer) == text[len(text.rstrip()):] + ROW["target"] + answer_suffix(template, tokenizer)


def test_chat_template_wraps_the_context_as_a_user_turn(tokenizer):
    text = tokenizer.decode(encode_prompt(ROW["context"], "chat", tokenizer))
    assert text == f"<|user|>{ROW['context']}<|assistant|>"
    assert answer_suffix("chat", tokenizer) == "</s>"


def test_long_prompts_lose_their_left_end_not_the_answer(tokenizer):
    long_row = {"context": "filler words " * 100 + ROW["context"], "target": "negative"}
    example = encode_example(long_row, "plain", tokenizer, max_seq_length=32)
    answer = encode_completion(long_row["context"], "negative", "plain", tokenizer).answer_ids
    assert len(example["input_ids"]) == 32
    assert example["input_ids"][-len(answer):] == answer
    assert tokenizer.decode(example["input_ids"][: 32 - len(answer)]).endswith("Answer:")


def test_packed_batch_gives_the_same_loss_as_padded(tiny_model_dir, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    model.config.use_cache = False  # as lora.adapters.attach.attach_adapter sets it for training
    rows = [ROW, {"context": "Input: The bank cut its dividend and reported a loss.\nAnswer: ", "target": "negative"},
            {"context": "Answer: ", "target": "neutral"}]
    features = [encode_example(row, "plain", tokenizer, 128) for row in rows]
    padded = build_collator(tokenizer, packing=False)([dict(f) for f in features])
    packed = build_collator(tokenizer, packing=True)([dict(f) for f in features])
    assert padded["input_ids"].shape[0] == 3 and packed["input_ids"].shape[0] == 1
    with torch.no_grad():
        padded_logits = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
        packed_logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).logits
    # Per-example logits must agree: attention never crosses example boundaries in the packed row.
    offset = 0
    for i, feature in enumerate(features):
        n = len(feature["input_ids"])
        torch.testing.assert_close(packed_logits[0, offset:offset + n], padded_logits[i, :n], atol=1e-5, rtol=1e-4)
        offset += n

    # The loss targets are the same: each example's answer tokens, nothing at the seams between examples (the last
    # token of one example never learns to predict the first token of the next) and nothing in the padding.
    def targets(labels):  # the tokens the loss learns, row by row, after the causal shift
        return [int(token) for row in labels[:, 1:] for token in row[row != IGNORE_INDEX]]

    padded_targets, packed_targets = targets(padded["labels"]), targets(packed["labels"])
    assert packed_targets == padded_targets == [t for f in features for t in f["labels"] if t != IGNORE_INDEX]
    with torch.no_grad():
        padded_loss = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"],
                            labels=padded["labels"]).loss
        packed_loss = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"],
                            labels=packed["labels"]).loss
    torch.testing.assert_close(packed_loss, padded_loss, atol=1e-5, rtol=1e-5)


def _write_rows(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_the_run_records_encoding_report_covers_the_training_rows_only(tmp_path, tokenizer):
    """The boundary report in the run record counts the rows the run trained on: not the validation split, not
    the rows max_train_examples left out."""
    from lora.training.data_mixture import encoding_report

    rows = [{"context": f"Input: headline number {i}.\nAnswer: ", "target": "positive"} for i in range(20)]
    recipe = {"prompt_template": "plain", "dataset_path": _write_rows(tmp_path / "train.jsonl", rows), "seed": 3,
              "validation_path": None, "validation_split": 0.2, "max_train_examples": 10, "max_seq_length": 24,
              "trainer": "sft", "datasets": None}
    data = build_datasets(recipe, tokenizer)
    assert (len(data.train), len(data.validation)) == (10, 4)
    assert encoding_report(recipe, tokenizer, data)["rows"] == 10


def test_datasets_hold_every_row_encoded_split_and_capped_as_the_recipe_says(tmp_path, tokenizer):
    rows = [{"context": f"Input: headline number {i}.\nAnswer: ", "target": ("positive", "negative")[i % 2]}
            for i in range(20)]
    held_out = [{"context": f"Input: held-out headline {i}.\nAnswer: ", "target": "neutral"} for i in range(3)]
    recipe = {"prompt_template": "plain", "dataset_path": _write_rows(tmp_path / "train.jsonl", rows), "seed": 3,
              "validation_path": None, "validation_split": 0.2, "max_train_examples": None, "max_seq_length": 24,
              "trainer": "sft", "datasets": None}
    expected = {tuple(e["input_ids"]): e["labels"] for e in (encode_example(r, "plain", tokenizer, 24) for r in rows)}

    train, validation = build_datasets(recipe, tokenizer)
    assert (len(train), len(validation)) == (16, 4)
    assert train.column_names == validation.column_names == ["input_ids", "labels"]
    examples = list(train) + list(validation)
    # each row exactly once, in one of the two, encoded with the answer-only labels at max_seq_length
    assert sorted(tuple(e["input_ids"]) for e in examples) == sorted(expected)
    assert all(e["labels"] == expected[tuple(e["input_ids"])] for e in examples)

    assert build_datasets(recipe, tokenizer).train["input_ids"] == train["input_ids"]  # the seed fixes the order
    assert build_datasets({**recipe, "seed": 4}, tokenizer).train["input_ids"] != train["input_ids"]
    unsplit, none = build_datasets({**recipe, "validation_split": 0}, tokenizer)
    assert none is None and len(unsplit) == 20

    given = {**recipe, "validation_path": _write_rows(tmp_path / "val.jsonl", held_out), "max_train_examples": 4}
    capped, validation = build_datasets(given, tokenizer)
    assert len(capped) == 4  # the cap is on training rows only, after the shuffle
    assert capped["input_ids"] == unsplit["input_ids"][:4]
    assert validation["input_ids"] == [encode_example(r, "plain", tokenizer, 24)["input_ids"] for r in held_out]
    assert len(build_datasets({**recipe, "max_train_examples": 50, "validation_split": 0}, tokenizer).train) == 20


def test_padded_batches_pad_labels_with_the_ignore_index_to_the_longest_example(tokenizer):
    features = [encode_example(row, "plain", tokenizer, 128) for row in
                (ROW, {"context": "Answer: ", "target": "neutral"})]
    batch = build_collator(tokenizer, packing=False)([dict(f) for f in features])
    longest = max(len(f["input_ids"]) for f in features)
    assert batch["input_ids"].shape == batch["labels"].shape == (2, longest)
    short = min(features, key=lambda f: len(f["input_ids"]))
    row = [i for i, f in enumerate(features) if f is short][0]
    padding = longest - len(short["input_ids"])
    kept = batch["labels"][row][batch["attention_mask"][row].bool()].tolist()
    assert kept == short["labels"] and (batch["labels"][row] == IGNORE_INDEX).sum() >= padding


def test_datasets_refuse_the_chat_template_on_a_tokenizer_without_one(tmp_path, tokenizer):
    from tiny_model import with_chat_template

    plain_only = with_chat_template(tokenizer, None)
    recipe = {"prompt_template": "chat", "dataset_path": _write_rows(tmp_path / "train.jsonl", [ROW]), "seed": 0,
              "validation_path": None, "validation_split": 0, "max_train_examples": None, "max_seq_length": 64}
    with pytest.raises(UserError, match="chat template"):
        build_datasets(recipe, plain_only)

"""Training datasets from FinLoRA rows: encoded examples (answer-only labels), the collator, validation split."""

from __future__ import annotations

from lora.prompts.rows import load_rows
from lora.prompts.templates import IGNORE_INDEX, check_template, encode_completion

__all__ = ["build_collator", "build_datasets", "encode_example", "split_rows"]


def encode_example(row: dict, template: str, tokenizer, max_seq_length: int) -> dict[str, list[int]]:
    """input_ids and labels for one row; the loss sees only the answer. Long prompts lose their left end."""
    pair = encode_completion(row["context"], row["target"], template, tokenizer)
    answer = pair.answer_ids[:max_seq_length]
    prompt = pair.prompt_ids[max(0, pair.answer_start + len(answer) - max_seq_length) :]
    return {
        "input_ids": prompt + answer,
        "labels": [IGNORE_INDEX] * len(prompt) + answer,
    }


def split_rows(recipe):
    """The recipe's training and validation rows (`datasets.Dataset`s of FinLoRA rows, not yet encoded; validation
    None when the recipe has none): the one rule for which rows are held out, shared by training and sweeps."""
    from datasets import Dataset  # imported here: `--dry-run` and `--list` never need it

    train = Dataset.from_list(load_rows(recipe["dataset_path"])).shuffle(seed=recipe["seed"])
    validation = None
    if recipe["validation_path"]:
        validation = Dataset.from_list(load_rows(recipe["validation_path"]))
    elif recipe["validation_split"] > 0:
        split = train.train_test_split(test_size=recipe["validation_split"], seed=recipe["seed"])
        train, validation = split["train"], split["test"]
    if recipe["max_train_examples"]:
        train = train.select(range(min(recipe["max_train_examples"], len(train))))
    return train, validation


def build_datasets(recipe, tokenizer):
    """Tokenised train (and optional validation) `datasets.Dataset`s for a resolved recipe."""
    template = recipe["prompt_template"]
    check_template(template, tokenizer)
    train, validation = split_rows(recipe)

    def encode(row):
        return encode_example(row, template, tokenizer, recipe["max_seq_length"])

    train = train.map(encode, remove_columns=train.column_names)
    if validation is not None:
        validation = validation.map(encode, remove_columns=validation.column_names)
    return train, validation


def build_collator(tokenizer, packing: bool):
    """Dynamic padding (pad to the longest in the batch), or padding-free packing of the whole batch."""
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

    if packing:
        # One row of concatenated examples with position ids restarting per example; attention is kept inside
        # each example (tests/test_data.py checks the packed loss equals the padded one).
        return DataCollatorWithFlattening(separator_id=IGNORE_INDEX)
    return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX, padding="longest")

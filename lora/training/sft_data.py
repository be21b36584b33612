"""Training datasets from a recipe's rows: encoded examples (answer-only labels), the collator, validation split.

FinLoRA rows train on their target (lora.prompts.templates.encode_completion); chat rows on every assistant turn
(lora.prompts.chat.encode_conversation). Which rows: lora.training.data_mixture (dataset_path or a mixture).
"""

from __future__ import annotations

from lora.prompts.chat import encode_conversation, require_chat_template
from lora.prompts.templates import IGNORE_INDEX, check_template, encode_completion
from lora.training.data_mixture import TrainingData, training_rows

__all__ = ["build_collator", "build_datasets", "encode_example", "encode_row"]


def encode_example(row: dict, template: str, tokenizer, max_seq_length: int) -> dict[str, list[int]]:
    """input_ids and labels for one row; the loss sees only the answer. Long prompts lose their left end."""
    pair = encode_completion(row["context"], row["target"], template, tokenizer)
    answer = pair.answer_ids[:max_seq_length]
    prompt = pair.prompt_ids[max(0, pair.answer_start + len(answer) - max_seq_length) :]
    return {
        "input_ids": prompt + answer,
        "labels": [IGNORE_INDEX] * len(prompt) + answer,
    }


def encode_row(row: dict, template: str, tokenizer, max_seq_length: int, where: str = "row") -> dict[str, list[int]]:
    """A FinLoRA row (loss on its target) or a chat row (loss on every assistant turn), encoded."""
    if "messages" in row:
        require_chat_template(tokenizer, where)
        return encode_conversation(row["messages"], tokenizer, max_seq_length, where=where)
    return encode_example(row, template, tokenizer, max_seq_length)


def build_datasets(recipe, tokenizer) -> TrainingData:
    """Tokenised train (and optional validation) `datasets.Dataset`s for a resolved recipe, and the per-file record."""
    from datasets import Dataset  # imported here: `--dry-run` and `--list` never need it

    template = recipe["prompt_template"]
    check_template(template, tokenizer)
    rows = training_rows(recipe)
    length = recipe["max_seq_length"]
    train = Dataset.from_list([encode_row(row, template, tokenizer, length, where)
                               for row, where in zip(rows.train, rows.train_where, strict=True)])
    validation = None
    if rows.validation is not None:
        validation = Dataset.from_list([encode_row(row, template, tokenizer, length, "validation row")
                                        for row in rows.validation])
    return TrainingData(train=train, validation=validation, record=rows.record, rows=rows)


def build_collator(tokenizer, packing: bool):
    """Dynamic padding (pad to the longest in the batch), or padding-free packing of the whole batch."""
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

    if packing:
        # One row of concatenated examples with position ids restarting per example; attention is kept inside
        # each example (tests/test_data.py checks the packed loss equals the padded one).
        return DataCollatorWithFlattening(separator_id=IGNORE_INDEX)
    return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX, padding="longest")

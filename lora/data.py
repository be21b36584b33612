"""Rows, prompts and tokens: the one place that turns FinLoRA rows into model inputs.

Training and evaluation both call `encode_prompt` / `encode_answer`, so the prompt a model is scored with is
byte-for-byte the prompt it was trained with. Rows are FinLoRA's JSONL format: `{"context": ..., "target": ...}`.

Prompt templates:
- "plain": the context as written (FinLoRA contexts end in "Answer: "), then the target and the EOS token.
- "chat":  the context as the user turn of the tokenizer's chat template, the target as the assistant turn.
- any string containing "{context}": the context substituted in, then the target and the EOS token.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from lora.errors import DataError

IGNORE_INDEX = -100  # label value the loss skips: prompt tokens and padding
BUILTIN_TEMPLATES = ("plain", "chat")


def data_file_problem(path: str | Path) -> str | None:
    """Why `path` cannot be read as a data file (missing, a folder, not a regular file), or None."""
    path = Path(path)
    if path.is_dir():
        return f"data file {path} is a folder, expected a JSONL file of {{\"context\", \"target\"}} rows"
    if not path.exists():
        return f"data file {path} does not exist (expected a JSONL file of {{\"context\", \"target\"}} rows)"
    if not path.is_file():
        return f"data file {path} is not a regular file, expected a JSONL file of {{\"context\", \"target\"}} rows"
    return None


def load_rows(path: str | Path, *, required: tuple[str, ...] = ("context", "target")) -> list[dict]:
    """Read a JSONL file of objects with string `required` keys; a `target` must not be empty.

    Raises:
        DataError: naming the file for a missing file or a folder, and file:line for a line that is not UTF-8,
            invalid JSON, or a row without the required strings or with an empty target.
    """
    path = Path(path)
    problem = data_file_problem(path)
    if problem:
        raise DataError(problem + ".")
    rows = []
    with path.open("rb") as handle:  # bytes, so that a line that is not UTF-8 can be named
        for line_number, raw_line in enumerate(handle, start=1):
            where = f"{path}:{line_number}"
            try:
                line = raw_line.decode("utf-8")
            except UnicodeDecodeError as error:
                raise DataError(f"{where}: byte 0x{raw_line[error.start]:02x} at column {error.start + 1} is not "
                                "UTF-8 (save the file as UTF-8).") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{where}: not valid JSON ({error.msg} at column {error.colno}).") from None
            if not isinstance(row, dict):
                expected = ", ".join(required)
                raise DataError(f"{where}: expected a JSON object with {expected}, got {type(row).__name__}.")
            for key in required:
                if key not in row:
                    present = ", ".join(sorted(row)) or "no keys"
                    raise DataError(f'{where}: missing "{key}" (row has {present}; expected {", ".join(required)}).')
                if not isinstance(row[key], str):
                    raise DataError(f'{where}: "{key}" must be a string, got {type(row[key]).__name__}.')
            if "target" in required and not row["target"].strip():
                # An empty answer trains only the end-of-answer token and scores as nothing: a broken row.
                raise DataError(f'{where}: "target" is empty (expected the answer text, e.g. "positive").')
            rows.append(row)
    if not rows:
        raise DataError(f"{path} has no rows.")
    return rows


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_template(template: str, tokenizer=None) -> None:
    """Raise DataError when a template cannot work (unknown name, or 'chat' on a tokenizer without one)."""
    if template not in BUILTIN_TEMPLATES and "{context}" not in template:
        raise DataError(
            f'prompt_template "{template}" is neither "plain", "chat" nor a format string containing {{context}}.'
        )
    if template == "chat" and tokenizer is not None and not getattr(tokenizer, "chat_template", None):
        raise DataError(
            'prompt_template "chat" needs a tokenizer with a chat template; this one has none (use "plain").'
        )


def prompt_text(context: str, template: str, tokenizer) -> str:
    """The text the model sees before the answer."""
    if template == "plain":
        return context
    if template == "chat":
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": context}], add_generation_prompt=True, tokenize=False
        )
    return template.replace("{context}", context)


def answer_suffix(template: str, tokenizer) -> str:
    """Text that closes an answer: the chat template's end of turn, or the EOS token."""
    if template == "chat":
        marker = "\x00ANSWER\x00"
        user = [{"role": "user", "content": "x"}]
        prompt = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": marker}], tokenize=False)
        if full.startswith(prompt) and marker in full:
            return full.split(marker, 1)[1]
    return tokenizer.eos_token or ""


def encode_prompt(context: str, template: str, tokenizer) -> list[int]:
    # Chat templates write their own special tokens; plain prompts get the tokenizer's (e.g. BOS).
    add_special = template != "chat"
    return tokenizer(prompt_text(context, template, tokenizer), add_special_tokens=add_special)["input_ids"]


def encode_answer(target: str, template: str, tokenizer, *, close: bool = True) -> list[int]:
    """Token ids of the answer, tokenised on its own so that training and choice scoring see the same ids."""
    ids = tokenizer(target, add_special_tokens=False)["input_ids"]
    if close:
        ids = ids + tokenizer(answer_suffix(template, tokenizer), add_special_tokens=False)["input_ids"]
    return ids


def encode_example(row: dict, template: str, tokenizer, max_seq_length: int) -> dict[str, list[int]]:
    """input_ids and labels for one row; the loss sees only the answer. Long prompts lose their left end."""
    prompt = encode_prompt(row["context"], template, tokenizer)
    answer = encode_answer(row["target"], template, tokenizer)[:max_seq_length]
    prompt = prompt[max(0, len(prompt) + len(answer) - max_seq_length) :]
    return {
        "input_ids": prompt + answer,
        "labels": [IGNORE_INDEX] * len(prompt) + answer,
    }


def build_datasets(recipe, tokenizer):
    """Tokenised train (and optional validation) `datasets.Dataset`s for a resolved recipe."""
    from datasets import Dataset  # imported here: `--dry-run` and `--list` never need it

    template = recipe["prompt_template"]
    check_template(template, tokenizer)
    train = Dataset.from_list(load_rows(recipe["dataset_path"])).shuffle(seed=recipe["seed"])
    validation = None
    if recipe["validation_path"]:
        validation = Dataset.from_list(load_rows(recipe["validation_path"]))
    elif recipe["validation_split"] > 0:
        split = train.train_test_split(test_size=recipe["validation_split"], seed=recipe["seed"])
        train, validation = split["train"], split["test"]
    if recipe["max_train_examples"]:
        train = train.select(range(min(recipe["max_train_examples"], len(train))))

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

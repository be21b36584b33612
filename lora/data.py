"""Rows, prompts and tokens: the one place that turns FinLoRA rows into model inputs.

Training, evaluation, GRPO and serving all encode through `encode_text_pair`: an example is the tokenisation of
the whole text (prompt, answer, closing token), with the prompt's trailing whitespace moved to the answer as
lm-eval does, so every tool sees the ids the tokenizer gives the whole text.
Rows are FinLoRA's JSONL format: `{"context": ..., "target": ...}`.

Prompt templates:
- "plain": the context as written (FinLoRA contexts end in "Answer: "), then the target and the EOS token.
- "chat":  the context as the user turn of the tokenizer's chat template, the target as the assistant turn.
- any string containing "{context}": the context substituted in, then the target and the EOS token.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
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


def adds_special_tokens(template: str) -> bool:
    """Whether the tokenizer adds its own special tokens (e.g. BOS): chat templates write theirs into the text."""
    return template != "chat"


def split_at_boundary(prompt: str, answer: str) -> tuple[str, str]:
    """The prompt's trailing whitespace moved to the front of the answer, as lm-eval's `_encode_pair` does.

    Byte-level BPE tokenizers glue a space to the word after it: "Answer: neutral" is [..., ":", " neutral"], never
    [..., ":", " ", "neutral"]. Cutting after the prompt's whitespace would train (and score) a token sequence the
    tokenizer never produces from the whole text, and other tools (lm-eval, any server that tokenises whole
    strings) would score an adapter on tokens it was never trained to produce there.
    """
    stripped = prompt.rstrip()
    return stripped, prompt[len(stripped) :] + answer


@dataclass(frozen=True)
class EncodedPair:
    """A prompt + answer text encoded by the one rule; `input_ids` are the tokenizer's ids of the whole text.

    Attributes:
        input_ids: ids of the whole text (prompt, answer and whatever closes it).
        answer_start: index of the first answer token; the loss and choice scores cover input_ids[answer_start:].
        clean: the prompt's own ids equal input_ids[:answer_start]. When False a token straddles the boundary
            (the prompt's last characters merged with the answer's first): it counts as an answer token, and the
            prompt a model is given to generate from differs from the one it was trained after.
    """

    input_ids: list[int]
    answer_start: int
    clean: bool

    @property
    def prompt_ids(self) -> list[int]:
        return self.input_ids[: self.answer_start]

    @property
    def answer_ids(self) -> list[int]:
        return self.input_ids[self.answer_start :]


def encode_text_pair(prompt: str, answer: str, tokenizer, *, add_special_tokens: bool) -> EncodedPair:
    """The encoding rule every tool here shares (training, choice scoring, generation and serving prompts).

    The whole text is tokenised once; the answer starts where the whole text's ids stop agreeing with the ids of
    the prompt alone (trailing whitespace moved to the answer first, see `split_at_boundary`).
    """
    prompt, answer = split_at_boundary(prompt, answer)
    whole = tokenizer(prompt + answer, add_special_tokens=add_special_tokens)["input_ids"]
    alone = tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"]
    start = 0
    while start < min(len(whole), len(alone)) and whole[start] == alone[start]:
        start += 1
    return EncodedPair(input_ids=whole, answer_start=start, clean=start == len(alone))


def encode_prompt_text(text: str, tokenizer, *, add_special_tokens: bool = True) -> list[int]:
    """Ids of a prompt text a model continues (generation, serving): the prompt side of `encode_text_pair`."""
    prompt, _ = split_at_boundary(text, "")
    return tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"]


def encode_prompt(context: str, template: str, tokenizer) -> list[int]:
    """Ids a model generates an answer after: the row's prompt under `template`, trailing whitespace left out."""
    return encode_prompt_text(prompt_text(context, template, tokenizer), tokenizer,
                              add_special_tokens=adds_special_tokens(template))


def encode_completion(context: str, answer: str, template: str, tokenizer, *, close: bool = True) -> EncodedPair:
    """A row's prompt followed by `answer` (and, when `close`, the template's end of answer), by the one rule."""
    text = answer + (answer_suffix(template, tokenizer) if close else "")
    return encode_text_pair(prompt_text(context, template, tokenizer), text, tokenizer,
                            add_special_tokens=adds_special_tokens(template))


def encode_example(row: dict, template: str, tokenizer, max_seq_length: int) -> dict[str, list[int]]:
    """input_ids and labels for one row; the loss sees only the answer. Long prompts lose their left end."""
    pair = encode_completion(row["context"], row["target"], template, tokenizer)
    answer = pair.answer_ids[:max_seq_length]
    prompt = pair.prompt_ids[max(0, pair.answer_start + len(answer) - max_seq_length) :]
    return {
        "input_ids": prompt + answer,
        "labels": [IGNORE_INDEX] * len(prompt) + answer,
    }


def boundary_report(rows: list[dict], template: str, tokenizer) -> dict:
    """For the run record: the encoding rule, and how many rows' prompt/answer boundary could not be split cleanly."""
    unclean = [i for i, row in enumerate(rows)
               if not encode_completion(row["context"], row["target"], template, tokenizer).clean]
    return {
        "rule": "whole text tokenised at once; the prompt's trailing whitespace belongs to the answer (as lm-eval)",
        "rows": len(rows),
        "unclean_boundaries": len(unclean),
        "unclean_rows": unclean[:10],
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

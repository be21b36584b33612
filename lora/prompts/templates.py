"""Rows, prompts and tokens: the one place that turns FinLoRA rows into model inputs.

Training, evaluation, GRPO and serving all encode through `encode_text_pair`: an example is the tokenisation of
the whole text (prompt, answer, closing token), with the prompt's trailing whitespace moved to the answer as
lm-eval does, so every tool sees the ids the tokenizer gives the whole text.
Rows are FinLoRA's JSONL format: `{"context": ..., "target": ...}`.

Prompt templates:
- "plain": the context as written (FinLoRA contexts end in "Answer: "), then the target and the EOS token.
- "chat":  the context as the user turn of the tokenizer's chat template, the target as the assistant turn.
- any string containing "{context}": the context substituted in, then the target and the EOS token.
A context may also be a conversation (a list of {"role", "content"} messages up to the answer, as
lora.prompts.chat.conversation_as_row gives for chat rows): it is rendered with the tokenizer's chat template and its
generation prompt whatever the template says, since that is the prompt a chat row trains the answer after.
"""

from __future__ import annotations

from dataclasses import dataclass

from lora.core.errors import DataError

__all__ = [
    "adds_special_tokens",
    "answer_suffix",
    "boundary_report",
    "BUILTIN_TEMPLATES",
    "check_template",
    "common_prefix_length",
    "encode_completion",
    "encode_prompt",
    "encode_prompt_text",
    "encode_text_pair",
    "EncodedPair",
    "IGNORE_INDEX",
    "prompt_text",
    "split_at_boundary",
    "template_for",
]

IGNORE_INDEX = -100  # label value the loss skips: prompt tokens and padding
BUILTIN_TEMPLATES = ("plain", "chat")


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


def template_for(context, template: str) -> str:
    """The template a row is encoded under: "chat" for a conversation context, `template` otherwise."""
    return "chat" if isinstance(context, list) else template


def prompt_text(context: str | list[dict], template: str, tokenizer) -> str:
    """The text the model sees before the answer."""
    if isinstance(context, list):
        return tokenizer.apply_chat_template(context, add_generation_prompt=True, tokenize=False)
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
    start = common_prefix_length(alone, whole)
    return EncodedPair(input_ids=whole, answer_start=start, clean=start == len(alone))


def common_prefix_length(part: list[int], whole: list[int]) -> int:
    """How many leading ids of `part` (the ids of a text's beginning) agree with `whole` (the ids of the whole text):
    where an answer starts under the one encoding rule."""
    length = 0
    while length < min(len(part), len(whole)) and part[length] == whole[length]:
        length += 1
    return length


def encode_prompt_text(text: str, tokenizer, *, add_special_tokens: bool = True) -> list[int]:
    """Ids of a prompt text a model continues (generation, serving): the prompt side of `encode_text_pair`."""
    prompt, _ = split_at_boundary(text, "")
    return tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"]


def encode_prompt(context: str | list[dict], template: str, tokenizer) -> list[int]:
    """Ids a model generates an answer after: the row's prompt under `template`, trailing whitespace left out."""
    template = template_for(context, template)
    return encode_prompt_text(prompt_text(context, template, tokenizer), tokenizer,
                              add_special_tokens=adds_special_tokens(template))


def encode_completion(context: str | list[dict], answer: str, template: str, tokenizer, *,
                      close: bool = True) -> EncodedPair:
    """A row's prompt followed by `answer` (and, when `close`, the template's end of answer), by the one rule."""
    template = template_for(context, template)
    text = answer + (answer_suffix(template, tokenizer) if close else "")
    return encode_text_pair(prompt_text(context, template, tokenizer), text, tokenizer,
                            add_special_tokens=adds_special_tokens(template))


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

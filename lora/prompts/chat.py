"""Chat datasets: rows {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}]} (the convention of TRL
and the OpenAI format), rendered with the tokenizer's own chat template.

The rule, shared by training, scoring and serving:
- training: the conversation is rendered once and tokenised once; the loss covers every assistant turn (the text the
  template writes for that turn, its end-of-turn token included) and nothing else. A turn starts where the
  generation prompt before it ends, with that prompt's trailing whitespace moved to the turn (the boundary rule of
  lora.prompts.templates.split_at_boundary), and token boundaries are found as lora.prompts.templates finds them:
  the ids of the text up to a boundary against the ids of the whole text (`common_prefix_length`).
- scoring (choice and generate) and serving: the prompt is the conversation up to the last assistant turn, rendered
  with the generation prompt; the answer is that turn (`conversation_as_row`). A one-turn conversation
  [user: C, assistant: T] therefore encodes exactly as a FinLoRA row {"context": C, "target": T} under
  prompt_template "chat" (tests/test_chat_data.py).
"""

from __future__ import annotations

from typing import Any

from lora.core.errors import DataError, did_you_mean
from lora.prompts.templates import IGNORE_INDEX, common_prefix_length, split_at_boundary

__all__ = [
    "ROLES",
    "check_conversation",
    "conversation_as_row",
    "encode_conversation",
    "render_conversation",
    "require_chat_template",
]

ROLES = ("system", "user", "assistant")


def require_chat_template(tokenizer, where: str) -> None:
    """Raise DataError naming `where` (a file, a file:line) when the tokenizer has no chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{where}: chat rows ({{\"messages\": [...]}}) are rendered with the tokenizer's chat "
                        "template, and this base model's tokenizer has none (use an instruct/chat model, or convert "
                        'the rows to {"context", "target"} rows with prompt_template "plain").')


def check_conversation(messages: Any, where: str, *, need_assistant: bool = True) -> list[dict]:
    """The row's messages when they form a conversation this runner can train on.

    Raises:
        DataError: naming `where` (file:line) and the first bad message: not a list of objects, an unknown role
            (with the nearest known one), a content that is not a string, or no assistant turn at all.
    """
    if not isinstance(messages, list) or not messages:
        raise DataError(f'{where}: "messages" must be a non-empty list of {{"role", "content"}} objects, got '
                        f"{type(messages).__name__ if messages != [] else 'an empty list'}.")
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise DataError(f'{where}: messages[{index}] must be an object {{"role", "content"}}, got '
                            f"{type(message).__name__}.")
        role = message.get("role")
        if role not in ROLES:
            raise DataError(f'{where}: messages[{index}].role {role!r} is not one of {", ".join(ROLES)}'
                            f"{did_you_mean(str(role), ROLES)}.")
        if not isinstance(message.get("content"), str):
            raise DataError(f'{where}: messages[{index}].content must be a string, got '
                            f"{type(message.get('content')).__name__} (role {role}).")
    if need_assistant and not any(message["role"] == "assistant" for message in messages):
        raise DataError(f'{where}: the conversation has no assistant turn, so there is nothing to learn (add a '
                        '{"role": "assistant", "content": ...} message).')
    return messages


def render_conversation(messages: list[dict], tokenizer, where: str, *, generation_prompt: bool = False) -> str:
    """The conversation as the tokenizer's chat template writes it (with the assistant header when asked).

    Raises:
        DataError: naming `where` (file:line), when the template refuses the conversation (Llama 2's and Mistral's
            raise on a system turn or on roles out of order).
    """
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template([{"role": m["role"], "content": m["content"]} for m in messages],
                                             add_generation_prompt=generation_prompt, tokenize=False)
    except TemplateError as error:
        raise DataError(
            f"{where}: the base model's chat template refuses this conversation ({error}). Write the rows as it "
            "accepts them (many templates take only alternating user and assistant turns: fold a system message "
            "into the first user turn)."
        ) from None


def _assistant_spans(messages: list[dict], tokenizer, where: str) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of each assistant turn in it."""
    text = render_conversation(messages, tokenizer, where)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render_conversation(messages[:index], tokenizer, where, generation_prompt=True) if index else ""
        through = render_conversation(messages[: index + 1], tokenizer, where)
        if not (text.startswith(through) and through.startswith(before)):
            raise DataError(f"{where}: the tokenizer's chat template renders the conversation up to assistant turn "
                            f"messages[{index}] differently from the start of the whole conversation (e.g. it "
                            "rewrites earlier turns), so that turn's tokens cannot be located; this template cannot "
                            "train on multi-turn rows here (keep one assistant turn per row).")
        prompt, _ = split_at_boundary(before, "")
        spans.append((len(prompt), len(through)))
    return text, spans


def encode_conversation(messages: list[dict], tokenizer, max_seq_length: int | None = None, *,
                        where: str = "conversation") -> dict[str, list[int]]:
    """input_ids and labels of a conversation: labels are the ids of every assistant turn, IGNORE_INDEX elsewhere.

    A conversation longer than `max_seq_length` loses its left end, as a FinLoRA row's prompt does.
    """
    text, spans = _assistant_spans(messages, tokenizer, where)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]  # the template writes its own special tokens
    labels = [IGNORE_INDEX] * len(ids)

    def token_index(position: int) -> int:
        # Tokens of the text up to `position` that the whole text's tokens agree with: a token that straddles a
        # turn's start belongs to the turn, one that straddles its end does not (as encode_text_pair splits).
        return common_prefix_length(tokenizer(text[:position], add_special_tokens=False)["input_ids"], ids)

    for start, end in spans:
        first, last = token_index(start), token_index(end)
        labels[first:last] = ids[first:last]
    if max_seq_length and len(ids) > max_seq_length:
        ids, labels = ids[-max_seq_length:], labels[-max_seq_length:]
    return {"input_ids": ids, "labels": labels}


def conversation_as_row(messages: list[dict], where: str) -> dict:
    """A chat row as the scoring harness and the server read rows: {"context": the conversation up to its last
    assistant turn, "target": that turn's content}. lora.prompts.templates renders a conversation context with the
    chat template and its generation prompt, so the prompt scored is the one the adapter learnt."""
    last = max(i for i, message in enumerate(messages) if message["role"] == "assistant")
    target = messages[last]["content"]
    if not target.strip():
        raise DataError(f'{where}: the last assistant turn is empty (expected the answer text, e.g. "positive").')
    return {"context": messages[:last], "target": target}

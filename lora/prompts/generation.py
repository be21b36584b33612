"""Generation as every tool here does it: which tokens end an answer, left padding, one `generate` call per batch,
and the cut at the first end token. The evaluation harness (greedy, batches grouped by length), GRPO (its stop
tokens) and the server (sampling, peft's `adapter_names` routing) all go through this module, so an answer ends at
the same token wherever it is produced.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from lora.prompts.templates import answer_suffix

__all__ = [
    "Continuation",
    "batches_by_length",
    "build_generation_config",
    "compute_dtype",
    "cut_at_stop",
    "declared_end_ids",
    "generate_batch",
    "generate_greedy",
    "left_pad",
    "model_device",
    "padding_token_id",
    "stop_strings",
    "stop_token_ids",
]


def declared_end_ids(generation_config) -> list[int]:
    """The end ids a model declares in its generation config (`eos_token_id`: one id, a list, or None)."""
    ids = getattr(generation_config, "eos_token_id", None)
    if ids is None:
        return []
    return list(ids) if isinstance(ids, (list, tuple)) else [ids]


def stop_token_ids(tokenizer, template: str, generation_config=None) -> list[int]:
    """The tokens that end an answer under `template`: generation stops at them and they are cut from the answer.

    - the tokenizer's EOS (what "plain" and format-string templates close a training answer with);
    - every end id the model declares (`generation_config.eos_token_id`: instruct models list their end of turn);
    - the first token of the template's end of answer (for "chat", the end-of-turn a chat-trained adapter emits).

    Not the pad token, unless it is one of these: a distinct pad token is filler, and a model that samples it has
    not ended its answer (GRPO's rewards would otherwise count such a completion as finished).

    Args:
        tokenizer: the model's tokenizer.
        template: the prompt template the answers were trained under ("plain", "chat" or a "{context}" string).
        generation_config: the model's `generation_config`, or None when only the tokenizer's ends count.

    Returns:
        The ids, EOS first, without repeats.
    """
    suffix_ids = tokenizer(answer_suffix(template, tokenizer), add_special_tokens=False)["input_ids"]
    candidates = [tokenizer.eos_token_id, *declared_end_ids(generation_config), *suffix_ids[:1]]
    return list(dict.fromkeys(token for token in candidates if token is not None))


def stop_strings(tokenizer, template: str, generation_config=None) -> list[str]:
    """The tokens of `stop_token_ids` as text, for tools that stop on strings (lm-eval's `until`).

    Each stop token decoded on its own, special tokens kept (lm-eval looks for its stop strings in text decoded that
    way while it generates), in the same order, without repeats or empty strings (an empty stop string would end
    every answer at once).
    """
    texts = (tokenizer.decode([token], skip_special_tokens=False)
             for token in stop_token_ids(tokenizer, template, generation_config))
    return list(dict.fromkeys(text for text in texts if text))


def padding_token_id(tokenizer, stop_ids: Sequence[int]) -> int:
    """The id that fills left padding: the tokenizer's pad token, else the first stop token (padding is masked)."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return stop_ids[0] if stop_ids else 0


def batches_by_length(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first: memory problems show up at once)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def model_device(model) -> torch.device:
    return model.get_input_embeddings().weight.device


def compute_dtype(model) -> torch.dtype:
    """The dtype of the hidden states (embedding dtype; quantised bases keep float embeddings)."""
    dtype = model.get_input_embeddings().weight.dtype
    return dtype if dtype.is_floating_point else torch.float32


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of prompts padded on the left, so every row's continuation starts at one column."""
    width = max(len(prompt) for prompt in prompts)
    input_ids = [[pad_id] * (width - len(prompt)) + list(prompt) for prompt in prompts]
    attention_mask = [[0] * (width - len(prompt)) + [1] * len(prompt) for prompt in prompts]
    return (
        torch.tensor(input_ids, dtype=torch.long, device=device),
        torch.tensor(attention_mask, dtype=torch.long, device=device),
    )


def build_generation_config(*, max_new_tokens: int, pad_id: int, stop_ids: Sequence[int], temperature: float = 0.0,
                            top_p: float = 1.0):
    """A `GenerationConfig`: greedy for temperature 0, else OpenAI-style sampling (temperature, top_p, no top-k)."""
    from transformers import GenerationConfig

    # top_k=0: OpenAI-style sampling has no top-k cut, transformers' default would be 50.
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        num_beams=1,
        use_cache=True,  # training may have switched the config's cache off (gradient checkpointing)
        pad_token_id=pad_id,
        eos_token_id=list(stop_ids) or None,
        **(sampling if temperature > 0 else {"do_sample": False}),
    )


def cut_at_stop(tokens: Sequence[int], stop_ids: Sequence[int]) -> tuple[list[int], bool]:
    """The tokens before the first stop token (which is dropped), and whether there was one."""
    for position, token in enumerate(tokens):
        if token in stop_ids:
            return list(tokens[:position]), True
    return list(tokens), False


@dataclass(frozen=True)
class Continuation:
    """One row's new tokens, cut at the first stop token, and whether that token ended it (else the length did)."""

    token_ids: list[int]
    stopped: bool


@torch.no_grad()
def generate_batch(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int | Sequence[int], pad_id: int,
                   stop_ids: Sequence[int], temperature: float = 0.0, top_p: float = 1.0,
                   **generate_kwargs) -> list[Continuation]:
    """One left-padded `generate` call for all `prompts`.

    Args:
        model: a causal LM (plain or peft).
        prompts: token ids of each prompt.
        max_new_tokens: the most new tokens, for all rows or per row (the call runs to the largest).
        pad_id: the id left padding is filled with (see `padding_token_id`).
        stop_ids: the tokens that end an answer (see `stop_token_ids`).
        temperature, top_p: 0 for greedy; above 0 samples (see `build_generation_config`).
        **generate_kwargs: passed on to `model.generate` (e.g. peft's `adapter_names`).

    Returns:
        One `Continuation` per prompt, in order.
    """
    limits = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    input_ids, attention_mask = left_pad(prompts, pad_id, model_device(model))
    config = build_generation_config(max_new_tokens=max(limits), pad_id=pad_id, stop_ids=stop_ids,
                                     temperature=temperature, top_p=top_p)
    output = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
                            **generate_kwargs)
    new_tokens = output[:, input_ids.shape[1] :].tolist()
    return [Continuation(*cut_at_stop(tokens[:limit], stop_ids)) for tokens, limit in zip(new_tokens, limits)]


def generate_greedy(
    model,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    pad_id: int,
    stop_ids: Sequence[int],
    batch_size: int = 16,
    on_batch: Callable[[int], None] | None = None,
) -> list[list[int]]:
    """Greedy continuations (new token ids only, cut at the first stop token), in batches of similar length."""
    outputs: list[list[int] | None] = [None] * len(prompts)
    for batch in batches_by_length([len(p) for p in prompts], batch_size):
        continuations = generate_batch(model, [prompts[i] for i in batch], max_new_tokens=max_new_tokens,
                                       pad_id=pad_id, stop_ids=stop_ids)
        for i, continuation in zip(batch, continuations):
            outputs[i] = continuation.token_ids
        if on_batch:
            on_batch(len(batch))
    return outputs
